"""`dba-ray run` end to end on tiny data, and `dba-ray eval`, on the session's cluster."""

import json

import pytest
import yaml
from conftest import make_docs, write_jsonl

from dba_ray.cli import main
from dba_ray.config import load_config
from dba_ray.prepare import ensure_base_model, ensure_global_gradient

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_run_writes_report_then_eval_scores_models(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="dba_ray")
    gen = write_jsonl(tmp_path / "gen.jsonl", make_docs(50, seed=0))
    gen_eval = write_jsonl(tmp_path / "gen_eval.jsonl", make_docs(8, seed=2))
    dom = write_jsonl(tmp_path / "dom.jsonl", [{"text": "def f(x):\n    return x + 1"}] * 40)
    dom_eval = write_jsonl(tmp_path / "dom_eval.jsonl", [{"text": "def g(y):\n    return y + 1"}] * 4)
    mc = write_jsonl(
        tmp_path / "mc.jsonl",
        [{"question": "def f(x): return", "choices": ["x + 1", "the cat"], "answer": 0}] * 3,
    )
    tree = {
        "output_dir": str(tmp_path / "out"),
        "pretrain": {"data": {"path": gen, "seq_len": 32}, "max_steps": 4, "batch_size": 4},
        "stage1": {"data": {"path": gen, "seq_len": 32}, "batch_size": 8, "second_moment": True},
        "train": {
            "data": {"path": dom, "seq_len": 32},
            "batch_size": 4,
            "max_steps": 5,
            "schedule": {"lr": 3e-3},
        },
        "eval": {
            "sets": [
                {"name": "dom", "kind": "domain", "data": {"path": dom_eval, "seq_len": 32}},
                {"name": "gen", "kind": "general", "data": {"path": gen_eval, "seq_len": 32}},
                {"name": "mc", "kind": "domain", "type": "choice", "data": {"path": mc, "seq_len": 32}},
            ]
        },
    }
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    assert main(["run", str(cfg_file)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["results"]) == {"dba", "direct"}
    for r in [report["base"], *report["results"].values()]:
        for key in ("S_D", "S_G", "S"):
            assert 0 <= r[key] <= 1
        assert r["S"] == pytest.approx(2 * r["S_D"] * r["S_G"] / (r["S_D"] + r["S_G"]))
    dba = report["results"]["dba"]
    assert dba["tokens"] > 0 and dba["wall_s"] > 0 and dba["steps"] == 5
    assert dba["delta"]["dom"]["nll"] == pytest.approx(dba["eval"]["dom"]["nll"] - report["base"]["eval"]["dom"]["nll"])
    # Fine-tuning on the repeated domain line must lower its NLL.
    assert report["results"]["direct"]["delta"]["dom"]["nll"] < 0
    assert set(report["base"]["eval"]["mc"]) == {"acc"}  # choice sets: accuracy only
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| base |" in md and "| dba |" in md and "kept more general ability" in md
    # boost 200 over 5 steps: γ_t never leaves 1, and the run says so, with the count.
    assert any("γ_t sits at gamma_max 1 for 5 of 5 steps" in r.message for r in caplog.records)

    # A second pipeline reuses the cached base model instead of pretraining again.
    caplog.clear()
    again = ensure_base_model(load_config(cfg_file))
    assert again.model.name_or_path.endswith("/pretrain/model")
    assert any("reusing the pretrained base model" in r.message for r in caplog.records)
    # Reusing ĝ_G is charged the wall time of the job that made it, not 0.
    reused = ensure_global_gradient(again)
    assert reused.reused and 0 < reused.wall_s <= report["stage1"]["wall_s"]

    # `dba-ray train` with the same config resumes the finished run: same model, scored.
    capsys.readouterr()
    assert main(["train", str(cfg_file), "--method", "direct"]) == 0
    out = capsys.readouterr().out
    assert f"direct: model saved to {report['results']['direct']['model_dir']}" in out
    assert f"S_D {report['results']['direct']['S_D']:.4f}" in out

    rc = main(
        [
            "eval",
            str(cfg_file),
            "--set",
            f"model.name_or_path={again.model.name_or_path}",
            "--set",
            f"eval.models.tuned={dba['model_dir']}",
        ]
    )
    assert rc == 0
    scored = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert scored["results"]["tuned"]["eval"]["dom"]["nll"] == pytest.approx(dba["eval"]["dom"]["nll"], rel=1e-4)
