"""The quality benchmark's rules (benchmarks/quality): choices read validation scores
only, paired intervals, verdicts and costs. Plain Python, no Ray."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "quality"))
from protocol import (  # noqa: E402
    Bootstrap,
    Candidate,
    Cost,
    bootstrap_paired,
    choose,
    edge_lrs,
    interval,
    paired,
    total_tokens,
)
from run import candidates  # noqa: E402


def _row(method, lr, val_s, test_s, seed=0):
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "S": test_s,
        "S_D": test_s,
        "S_G": test_s,
        "validation": {"S": val_s, "S_D": val_s, "S_G": val_s},
    }


def test_choices_read_validation_scores_never_test_scores():
    # The test scores rank the lrs the other way round: choosing on them picks 1e-3.
    report = {
        "results": {
            "direct_lr0.0001": _row("direct", 1e-4, 0.50, 0.40),
            "direct_lr0.0003": _row("direct", 3e-4, 0.60, 0.45),
            "direct_lr0.001": _row("direct", 1e-3, 0.55, 0.70),
        },
        "merges": {
            "direct_lr0.0003": {
                "points": [
                    {"knob": 0.5, "validation": {"S": 0.65}, "test": {"S": 0.30}},
                    {"knob": 0.25, "validation": {"S": 0.58}, "test": {"S": 0.90}},
                ]
            },
        },
    }
    spec = [{"name": "direct", "method": "direct"}]
    plain = choose(candidates("direct", spec, [report]))
    assert (plain.lr, plain.knob, plain.validation_s) == (3e-4, None, 0.60)
    merged = choose(candidates("direct+merge", spec, [report]))
    assert (merged.lr, merged.knob) == (3e-4, 0.5)  # test S would pick α 0.25 or lr 1e-3
    # Among one method's options (fisher λ), the best validation S wins, whatever the test says.
    fisher = [{"name": "fisher-0.01", "method": "dba"}, {"name": "fisher-1", "method": "dba"}]
    report2 = {"results": {"a": _row("fisher-0.01", 1e-3, 0.7, 0.1), "b": _row("fisher-1", 1e-3, 0.6, 0.9)}}
    assert choose(candidates("fisher", fisher, [report2])).spec["name"] == "fisher-0.01"


def test_a_validation_tie_goes_by_the_protocol_whatever_the_test_scores_say():
    # Two lrs tie on validation S; on test S the larger is far ahead (0.70 against 0.40).
    report = {
        "results": {
            "direct_lr0.0003": _row("direct", 3e-4, 0.60, 0.70),
            "direct_lr0.0001": _row("direct", 1e-4, 0.60, 0.40),
        }
    }
    lrs = candidates("direct", [{"name": "direct", "method": "direct"}], [report])
    assert choose(lrs).lr == 1e-4  # the smaller lr
    lambdas = [
        Candidate("fisher", {}, 3e-4, None, 0.6, option=0.01),
        Candidate("fisher", {}, 3e-4, None, 0.6, option=0.001),
    ]
    assert choose(lambdas).option == 0.001  # then the smaller λ (or r)
    # Only once lr and λ tie too does the knob decide, nearer the trained model: α 1 and λ_m 0 are it.
    alphas = [Candidate("m", {}, 3e-4, a, 0.6) for a in (0.5, 0.875, 0.75)]
    assert choose(alphas).knob == 0.875
    fisher_merge = [Candidate("m", {}, 3e-4, k, 0.6, trained_knob=0.0) for k in (1.0, 0.1, 3.0)]
    assert choose(fisher_merge).knob == 0.1
    mixed = [Candidate("m", {}, 1e-3, 1.0, 0.6, option=0.2), Candidate("m", {}, 3e-4, 0.25, 0.6, option=0.6)]
    assert choose(mixed).lr == 3e-4  # the lr decides before the ratio, the ratio before the knob
    assert choose([*lrs, Candidate("direct", {}, 1e-3, None, 0.6001)]).lr == 1e-3  # a higher S beats every tie rule


def _records(correct: np.ndarray, tokens: int = 100) -> np.ndarray:
    """Per-record sums (NLL sum, correct, tokens), every record ``tokens`` long."""
    return np.stack([np.zeros(len(correct)), correct, np.full(len(correct), tokens)], axis=1).astype(float)


def _runs(dom_by_seed: dict[int, np.ndarray], gen: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    return {s: {"dom": _records(c), "gen": _records(gen)} for s, c in dom_by_seed.items()}


def test_bootstrap_record_noise_matches_the_analytic_sd_and_is_paired():
    # Records differ a lot from each other (0 to 100 correct of 100) and the method moves
    # each by a little (+2 ± 3). Paired, ΔS_D's sd is that of the per-record change
    # over √n; an unpaired draw would add the records' own spread (sd about 29).
    rng = np.random.default_rng(1)
    n = 400
    ref = rng.integers(0, 101, n).astype(float)
    change = rng.normal(2.0, 3.0, n)
    gen = rng.integers(40, 61, n).astype(float)
    same = {s: ref for s in (1, 2, 3)}  # no seed noise: the records are the only source
    boot = bootstrap_paired(_runs({s: ref + change for s in same}, gen), _runs(same, gen), ["dom"], ["gen"])
    sd = change.std() / 100 / np.sqrt(n)  # accuracy = Σcorrect / Σtokens, 100 tokens a record
    assert boot["S_D"].mean == pytest.approx(change.mean() / 100)
    assert boot["S_D"].high - boot["S_D"].low == pytest.approx(2 * 1.96 * sd, rel=0.06)
    assert (boot["S_G"].low, boot["S_G"].mean, boot["S_G"].high) == (0, 0, 0)  # general sets unchanged
    assert boot["S_D"].verdict == "ahead" and boot["S"].verdict == "ahead"


def test_bootstrap_seed_resampling_is_rescaled_by_root_three_halves():
    # Every record alike, so resampling records changes nothing; the seeds' differences
    # are 0.01, 0.02, 0.03. Drawing 3 of them, all three are the smallest with
    # probability 1/27 > 2.5%, so the interval's ends are m ± √(3/2)·0.01.
    ref = np.full(50, 50.0)
    method = {1: ref + 1, 2: ref + 2, 3: ref + 3}
    boot = bootstrap_paired(_runs(method, ref), _runs({s: ref for s in method}, ref), ["dom"], ["gen"])
    half = np.sqrt(1.5) * 0.01
    assert (boot["S_D"].mean, boot["S_D"].low, boot["S_D"].high) == pytest.approx((0.02, 0.02 - half, 0.02 + half))
    with pytest.raises(ValueError, match="two or more seeds"):
        bootstrap_paired({1: method[1]}, {1: method[1]}, ["dom"], ["gen"])


def test_bootstrap_verdict_a_difference_inside_the_noise_is_a_tie():
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 101, 200).astype(float)
    gen = rng.integers(40, 61, 200).astype(float)
    seeds = {s: ref for s in (1, 2, 3)}

    def verdict(method_dom: dict[int, np.ndarray]) -> str:
        return bootstrap_paired(_runs(method_dom, gen), _runs(seeds, gen), ["dom"], ["gen"], replicates=2000)[
            "S"
        ].verdict

    noise = {s: rng.normal(0, 5, 200) for s in seeds}
    assert verdict({s: ref + noise[s] for s in seeds}) == "tie"  # ΔS_D about ±0.002 a seed, mean near 0
    assert verdict({s: ref + noise[s] + 6 for s in seeds}) == "ahead"
    assert verdict({s: ref + noise[s] - 6 for s in seeds}) == "behind"
    # Every record up by 0.1 of 100 tokens: no noise at all, but ΔS under δ_S.
    assert verdict({s: ref + 0.1 for s in seeds}) == "tie (< δ)"
    assert Bootstrap(0.0012, 0.0002, 0.0022, 3).verdict == "ahead"
    assert Bootstrap(-0.0012, -0.0022, 0.0001, 3).verdict == "tie"


def test_grid_extends_where_the_optimum_is_at_an_end():
    cands = [Candidate("m", {}, lr, None, s) for lr, s in ((1e-4, 0.1), (3e-4, 0.2), (1e-3, 0.3))]
    assert edge_lrs(cands, [1e-4, 3e-4, 1e-3]) == "high"
    cands[1] = Candidate("m", {}, 3e-4, None, 0.5)
    assert edge_lrs(cands, [1e-4, 3e-4, 1e-3]) is None


def test_paired_interval_and_verdict():
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, half-width t(2)·0.01/√3 = 0.02484
    iv = paired({1: 0.51, 2: 0.52, 3: 0.53}, {1: 0.50, 2: 0.50, 3: 0.50})
    assert iv.mean == pytest.approx(0.02) and iv.low == pytest.approx(0.02 - 0.024844, abs=1e-5)
    assert iv.verdict == "tie"
    assert interval([0.03, 0.035, 0.04]).verdict == "ahead"
    assert interval([-0.03, -0.035, -0.04]).verdict == "behind"


def test_costs_charge_stage1_once_and_the_ratio_search_per_domain():
    dba = Cost(run_tokens=100, runs_per_domain=1, stage1_tokens=1000)
    mixture = Cost(run_tokens=130, runs_per_domain=3, stage1_tokens=0)
    assert [total_tokens(dba, n) for n in (1, 4, 10)] == [1100, 1400, 2000]
    assert [total_tokens(mixture, n) for n in (1, 4, 10)] == [390, 1560, 3900]
    assert total_tokens(dba, 10, length=10) == 1000 + 10 * 1000


def test_state_carries_what_resumes_and_nothing_heavy(tmp_path):
    from run import carry_state

    out, state = tmp_path / "out", tmp_path / "state"
    files = {
        "global_gradient/meta.json": True,
        "global_gradient_svd/mean.safetensors": True,
        "medicine/pretrain/ab12/pretrain/model/model.safetensors": True,
        "medicine/pretrain/ab12/pretrain/curves.jsonl": True,
        "long/medicine/core-grid/phase.json": True,
        "long/medicine/core-grid/config.yaml": True,
        "long/medicine/core-grid/compare/trial_0/model.safetensors": False,  # a run's weights
        "medicine/pretrain/ab12/ray_train/checkpoint_0/shard.safetensors": False,
    }
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    carry_state(out, state)
    assert {n for n in files if (state / n).exists()} == {n for n, kept in files.items() if kept}
    # Back the other way, a file the destination has is left as it is.
    (out / "long/medicine/core-grid/phase.json").write_text("newer")
    carry_state(state, out)
    assert (out / "long/medicine/core-grid/phase.json").read_text() == "newer"
