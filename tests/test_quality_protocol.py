"""The quality benchmark's rules (benchmarks/quality): choices read validation scores
only, paired intervals, verdicts and costs. Plain Python, no Ray."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "quality"))
from protocol import Candidate, Cost, choose, edge_lrs, interval, paired, total_tokens  # noqa: E402
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
