"""`dba-ray run` end to end on tiny data, and `dba-ray eval`, on the session's cluster."""

import json

import pytest

from dba_ray.cli import main
from dba_ray.config import load_config
from dba_ray.prepare import ensure_base_model, ensure_global_gradient

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_run_writes_report_then_eval_scores_models(finished_run, capsys, caplog):
    # The session's finished `run` (conftest: pretraining, Stage 1, dba and direct for 8
    # steps, three eval sets): its report, then the commands that reuse what it made.
    cfg_file, report, run_dir = finished_run.cfg_file, finished_run.report, finished_run.run_dir
    assert set(report["results"]) == {"dba", "direct"}
    for r in [report["base"], *report["results"].values()]:
        for key in ("S_D", "S_G", "S"):
            assert 0 <= r[key] <= 1
        assert r["S"] == pytest.approx(2 * r["S_D"] * r["S_G"] / (r["S_D"] + r["S_G"]))
    dba = report["results"]["dba"]
    assert dba["tokens"] > 0 and dba["wall_s"] > 0 and dba["steps"] == 8
    assert dba["delta"]["dom"]["nll"] == pytest.approx(dba["eval"]["dom"]["nll"] - report["base"]["eval"]["dom"]["nll"])
    # Fine-tuning on the repeated domain line must lower its NLL.
    assert report["results"]["direct"]["delta"]["dom"]["nll"] < 0
    assert set(report["base"]["eval"]["mc"]) == {"acc"}  # choice sets: accuracy only
    md = (run_dir / "report.md").read_text()
    assert "| base |" in md and "| dba |" in md and "kept more general ability" in md
    # boost 16 over 8 steps: γ_t = min(1, 2·(1 − t/8)) is 1 for t = 0..4, and the run said so.
    assert "dba: γ_t sits at gamma_max 1 for 5 of 8 steps (boost 16)" in finished_run.log

    # Pretraining checkpointed every 10 steps (a killed one resumes), two kept.
    pretrain_ckpts = run_dir.glob("pretrain/*/ray_train/train-pretrain-*/checkpoint_*/state.json")
    assert sorted(json.loads(f.read_text())["step"] for f in pretrain_ckpts) == [20, 30]

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
    scored = json.loads((run_dir / "eval.json").read_text())
    assert scored["results"]["tuned"]["eval"]["dom"]["nll"] == pytest.approx(dba["eval"]["dom"]["nll"], rel=1e-4)
