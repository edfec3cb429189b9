"""Driver loss: `dba-ray run` killed with SIGKILL mid-way, then the same command again,
on the session's cluster (the killed driver's jobs die with it; the cluster does not)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
import yaml
from conftest import make_docs, write_jsonl

from dba_ray.cli import main

pytestmark = pytest.mark.usefixtures("ray_cluster")


def write_run_config(tmp_path, out: str, base: str | None = None) -> str:
    """A two-method run; with ``base``, on that run's pretrained model and ĝ_G."""
    gen = write_jsonl(tmp_path / "gen.jsonl", make_docs(40, seed=0))
    gen_eval = write_jsonl(tmp_path / "gen_eval.jsonl", make_docs(6, seed=2))
    dom = write_jsonl(tmp_path / "dom.jsonl", [{"text": f"def f{i}(x):\n    return x + {i}"} for i in range(40)])
    dom_eval = write_jsonl(tmp_path / "dom_eval.jsonl", [{"text": "def g(y):\n    return y + 1"}] * 4)
    tree = {
        "output_dir": str(tmp_path / out),
        "pretrain": {"data": {"path": gen, "seq_len": 32}, "max_steps": 3, "batch_size": 4},
        "stage1": {"data": {"path": gen, "seq_len": 32}, "batch_size": 8},
        "train": {
            "data": {"path": dom, "seq_len": 32}, "batch_size": 4, "max_steps": 8, "checkpoint_every": 2,
            "progress_interval_s": 5, "schedule": {"lr": 3e-3}, "dba": {"boost": 16},
        },
        "methods": ["dba", "direct"],
        "eval": {"sets": [
            {"name": "dom", "kind": "domain", "data": {"path": dom_eval, "seq_len": 32}},
            {"name": "gen", "kind": "general", "data": {"path": gen_eval, "seq_len": 32}},
        ]},
    }  # fmt: skip
    if base is not None:
        del tree["pretrain"]
        tree["model"] = {"name_or_path": str(next((tmp_path / base).glob("pretrain/*/pretrain/model")))}
        tree["stage1"]["output"] = str(tmp_path / base / "global_gradient")
    f = tmp_path / f"{out}.yaml"
    f.write_text(yaml.safe_dump(tree))
    return str(f)


def test_killed_run_resumes_where_it_was(tmp_path, caplog):
    ref_cfg = write_run_config(tmp_path, "uninterrupted")
    assert main(["run", ref_cfg]) == 0
    ref = json.loads((tmp_path / "uninterrupted" / "report.json").read_text())

    # The reference's base model and ĝ_G (both finished before the kill below in any
    # case; reusing them after pretraining is test_run's): two Train runs saved.
    cfg = write_run_config(tmp_path, "killed", base="uninterrupted")
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "dba_ray", "run", cfg], env=env, stdout=log, stderr=log)
    # SIGKILL once the second method has a checkpoint: the first method is finished,
    # the second is half-way.
    deadline = time.monotonic() + 900
    while not list(out.glob("ray_train/train-direct-*/checkpoint_*/state.json")):
        assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint of the second method in time"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (out / "report.json").exists() and not (out / "direct" / "model").exists()
    # Workers' logs reach the console, but not Ray's line per report with every step in it.
    console = (tmp_path / "killed.log").read_text()
    assert "RayTrainWorker" in console and "Reporting training result" not in console
    ghat_meta = tmp_path / "uninterrupted" / "global_gradient" / "meta.json"
    kept = ghat_meta.stat().st_mtime_ns

    caplog.set_level("INFO", logger="dba_ray")
    assert main(["run", cfg]) == 0
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "reusing the global gradient" in logged
    assert ghat_meta.stat().st_mtime_ns == kept  # no second Stage 1
    report = json.loads((out / "report.json").read_text())
    res = report["results"]
    assert res["dba"]["resumed_at"] == 8  # finished: loaded and scored, not trained again
    assert res["direct"]["resumed_at"] in (2, 4, 6)  # from its last checkpoint
    for name, want in [("base", ref["base"]), *((n, ref["results"][n]) for n in ("dba", "direct"))]:
        got = report["base"] if name == "base" else res[name]
        for key in ("S_D", "S_G", "S"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (name, key)
        for s, metrics in want["eval"].items():
            assert got["eval"][s] == pytest.approx(metrics, rel=1e-5), (name, s)
