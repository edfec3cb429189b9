"""Merging toward the base: the per-tensor formulas (plain torch), sharded model files,
and `dba-ray run` / `merge` / `tune` with merge curves on the session's Ray cluster."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_docs, on_finished_base, pretrained_base, write_jsonl
from transformers import AutoModelForCausalLM

from dba_ray.cli import main
from dba_ray.config import ModelConfig
from dba_ray.merge import EPS, FisherPair, SavedTensors, merge_into, merged_tensor
from dba_ray.model import load_model
from dba_ray.plots import frontier


def _models():
    base = load_model(ModelConfig(seed=0))
    trained = load_model(ModelConfig(seed=1))  # another point of the same architecture
    return base, trained


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_linear_ends_are_base_and_trained_and_middle_is_the_average():
    base, trained = _models()
    theta0, theta_t = _params(base), _params(trained)
    for alpha, expect in ((0.0, theta0), (1.0, theta_t)):
        model = load_model(ModelConfig(seed=1))
        merge_into(model, theta0, alpha)
        for n, p in model.named_parameters():
            assert torch.equal(p, expect[n]), (alpha, n)
    model = load_model(ModelConfig(seed=1))
    merge_into(model, theta0, 0.3)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), 0.7 * theta0[n] + 0.3 * theta_t[n])


def test_fisher_with_equal_weights_is_linear_at_one_half():
    base, trained = _models()
    theta0 = _params(base)
    names = list(theta0)
    # The same Fisher on both sides (any positive tensors): λ = 1 weighs them alike.
    fisher = {n: torch.rand_like(t) + 0.1 for n, t in theta0.items()}
    pair = FisherPair.of(fisher, fisher, names)
    fmodel, lmodel = load_model(ModelConfig(seed=1)), load_model(ModelConfig(seed=1))
    merge_into(fmodel, theta0, 1.0, pair)
    merge_into(lmodel, theta0, 0.5)
    for (_, f), (_, lin) in zip(fmodel.named_parameters(), lmodel.named_parameters()):
        torch.testing.assert_close(f, lin, rtol=1e-6, atol=1e-7)
    # λ = 0 is the trained model, exactly; a huge λ is the base wherever F_G > 0.
    zero = load_model(ModelConfig(seed=1))
    merge_into(zero, theta0, 0.0, pair)
    assert all(torch.equal(p, q) for p, q in zip(zero.parameters(), trained.parameters()))
    far = load_model(ModelConfig(seed=1))
    merge_into(far, theta0, 1e9, pair)
    for n, p in far.named_parameters():
        torch.testing.assert_close(p.detach(), theta0[n], rtol=1e-5, atol=1e-6)


def test_fisher_weighs_each_weight_and_falls_back_where_neither_sees_it():
    theta0, theta_t = torch.zeros(3), torch.ones(3)
    fg = torch.tensor([1.0, 0.0, 0.0])  # general cares about weight 0 only
    fd = torch.tensor([0.0, 1.0, 0.0])  # domain about weight 1 only; weight 2: neither
    merged = merged_tensor(theta0, theta_t, 2.0, (fg + EPS, fd + EPS))
    # weight 0 returns to the base, weight 1 keeps its trained value, weight 2 falls
    # back to linear interpolation with α = 1 / (1 + λ).
    torch.testing.assert_close(merged, torch.tensor([0.0, 1.0, 1 / 3]), rtol=0, atol=1e-5)
    assert not torch.allclose(merged, merged_tensor(theta0, theta_t, 0.5))  # not linear


def test_sharded_files_are_read_tensor_by_tensor_and_merged_model_loads(tmp_path):
    base, trained = _models()
    base.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    files = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(files) > 1  # really sharded
    reader = SavedTensors(str(tmp_path / "base"))
    theta0 = _params(base)
    assert set(reader) == set(theta0)
    model = load_model(ModelConfig(seed=1))
    merge_into(model, reader, 0.25)
    model.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p.detach(), theta0[n] + 0.25 * (_params(trained)[n] - theta0[n]))


def test_knobs_are_checked_for_their_mode(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"merge": {"mode": "linear", "knobs": [0.5, 2]}}))
    assert main(["options"]) == 0  # the merge section is documented
    assert "merge.mode" in capsys.readouterr().out
    assert main(["merge", str(cfg)]) == 2
    assert "linear merge knobs α must lie in [0, 1]" in capsys.readouterr().err


def test_merge_curves_in_run_merge_and_tune_choose_on_validation(finished_run, tmp_path):
    # On the session's finished run's base model (pretrained on its general text) and
    # ĝ_G with v_G (the fisher merge's general side): `direct` on its domain data.
    tree = yaml.safe_load(Path(finished_run.cfg_file).read_text())
    done = finished_run.run_dir
    gen_val = write_jsonl(tmp_path / "gen_val.jsonl", make_docs(8, seed=3))

    def text_set(name, kind, path):
        return {"name": name, "kind": kind, "data": {"path": path, "seq_len": 32}}

    on_finished_base(tree, finished_run)
    tree["output_dir"] = str(tmp_path / "out")
    tree["methods"] = ["direct"]
    tree["eval"]["sets"] = tree["eval"]["sets"][:2]  # dom and gen
    # Validation rewards general text only (both kinds are general text), so its choice
    # differs from what the eval sets, where the domain gain counts, would pick.
    tree["eval"]["validation_sets"] = [text_set("vd", "domain", gen_val), text_set("vg", "general", gen_val)]
    tree["merge"] = {"mode": "fisher", "knobs": [0, 1, 100]}
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    assert main(["run", str(cfg_file)]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    direct = report["results"]["direct"]
    assert direct["validation"]["S"] < report["base"]["validation"]["S"]  # forgot general text
    curve = report["merges"]["direct"]
    assert curve["mode"] == "fisher" and [p["knob"] for p in curve["points"]] == [0, 1, 100]
    # λ = 0 is the trained model: its point is the run's own scores, not scored again
    # (`dba-ray merge` below scores both ends and compares them with the run and the base).
    assert curve["points"][0]["test"] == {k: direct[k] for k in ("eval", "S_D", "S_G", "S")}
    assert curve["points"][0]["validation"] == direct["validation"]
    assert Path(curve["domain_fisher"], "meta.json").exists() and curve["fisher_tokens"] > 0
    assert curve["eval_tokens"] > 0 and "Merge curves toward the base (fisher" in (out / "report.md").read_text()
    assert (out / "frontier.png").stat().st_size > 0
    assert "direct merged (fisher)" in frontier(report, str(tmp_path / "f.png"))

    # `dba-ray merge` on the finished run, linear: α = 0 is the base, α = 1 the run.
    assert main(["merge", str(cfg_file), "--set", "merge.mode=linear", "--set", "merge.knobs=[0, 0.5, 1]"]) == 0
    merged = json.loads((out / "merge.json").read_text())
    points = {p["knob"]: p for p in merged["merges"]["direct"]["points"]}
    for s in ("dom", "gen"):
        assert points[0]["test"]["eval"][s]["nll"] == pytest.approx(merged["base"]["eval"][s]["nll"], rel=1e-6)
        assert points[1]["test"]["eval"][s]["nll"] == pytest.approx(direct["eval"][s]["nll"], rel=1e-5)
    # Chosen on validation S, never on the eval sets (which would pick another α here).
    chosen = merged["merges"]["direct"]["chosen"]
    assert chosen == max(points, key=lambda k: (points[k]["validation"]["S"], k))
    assert chosen != max(points, key=lambda k: (points[k]["test"]["S"], k)), "test data cannot tell the two apart"
    # The exported model: plain transformers, θ0 + α·(θ_T − θ0), its knob in merge.json.
    exported = Path(direct["model_dir"]).parent / "merged" / "model"
    info = json.loads((exported / "merge.json").read_text())
    assert info["knob"] == chosen and info["mode"] == "linear"
    model = AutoModelForCausalLM.from_pretrained(exported)
    theta0 = SavedTensors(pretrained_base(done))
    theta_t = SavedTensors(direct["model_dir"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta0[n] + chosen * (theta_t[n] - theta0[n]))

    # A tune sweep of the knob alone: each trial an evaluation on the validation sets,
    # equal to the merge curve's validation scores at the same α.
    assert (
        main(
            [
                "tune",
                str(cfg_file),
                "--set",
                "merge.mode=linear",
                "--set",
                "merge.knobs=null",
                "--set",
                "tune.method=direct",
                "--set",
                "tune.search={merge.knob: [0, 0.5, 1]}",
            ]
        )
        == 0
    )
    summary = json.loads((out / "tune.json").read_text())
    by_knob = {t["set"]["merge.knob"]: t for t in summary["trials"]}
    for k, p in points.items():
        assert by_knob[k]["S"] == pytest.approx(p["validation"]["S"], rel=1e-6)
    assert summary["best"]["set"]["merge.knob"] == chosen
    assert summary["best"]["test"]["S"] == pytest.approx(points[chosen]["test"]["S"], rel=1e-6)
    assert (out / "best" / "model" / "config.json").exists()
