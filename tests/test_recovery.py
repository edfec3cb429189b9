"""Driver loss: `dba-ray run`, `compare` and `global-gradient` killed with SIGKILL
mid-way, then the same command again, on the session's cluster (the killed driver's jobs die with it; the
cluster does not)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from conftest import make_docs, tiny_config, write_jsonl, write_run_config
from test_stage1 import ordered_sequences, reference_gradients, rel_error

from dba_ray import artifact
from dba_ray.cli import main

pytestmark = pytest.mark.usefixtures("ray_cluster")


def start_killable(args: list[str], log_path) -> subprocess.Popen:
    """``dba-ray ARGS`` as a driver of its own, joined to the session's cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "dba_ray", *args], env=env, stdout=log, stderr=log)


def sigkill_when(driver: subprocess.Popen, log_path, ready) -> None:
    deadline = time.monotonic() + 900
    while not ready():
        assert driver.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the command never got to where the kill belongs"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()


def checkpointed(out, method: str) -> bool:
    """A Train checkpoint of ``method`` under ``out`` that Ray Train has registered,
    whichever command wrote it. A checkpoint folder the controller had not yet recorded
    in its snapshot when the driver died is not resumed from (Ray Train's rule): a kill
    then loses that checkpoint interval, which no test here needs to exercise."""
    return bool(registered_runs(out, f"train-{method}-*"))


def registered_runs(out, pattern: str) -> list:
    """Run folders matching ``pattern`` under ``out`` with a registered checkpoint."""
    found = []
    for snapshot in out.glob(f"**/{pattern}/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text())["checkpoint_results"]:
                found.append(snapshot.parent)
        except (json.JSONDecodeError, KeyError, FileNotFoundError):  # being written
            continue
    return found


def assert_same_scores(got: dict, want: dict, name: str) -> None:
    for key in ("S_D", "S_G", "S"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), (name, key)
    for s, metrics in want["eval"].items():
        assert got["eval"][s] == pytest.approx(metrics, rel=1e-5), (name, s)


def test_killed_run_resumes_where_it_was(finished_run, caplog):
    tmp_path, ref = finished_run.folder, finished_run.report
    cfg = write_run_config(tmp_path, "killed", base=finished_run)
    out = tmp_path / "killed"
    # SIGKILL once the second method has a checkpoint: the first method is finished,
    # the second is half-way.
    driver = start_killable(["run", cfg], tmp_path / "killed.log")
    sigkill_when(driver, tmp_path / "killed.log", lambda: checkpointed(out / "ray_train", "direct"))
    assert not (out / "report.json").exists() and not (out / "direct" / "model").exists()
    # The first method's end reached the console, but not Ray's line per report with
    # every step in it (nor, by default, workers' own INFO lines: dba_ray/console.py).
    console = (tmp_path / "killed.log").read_text()
    assert "dba-ray: stage 2 (dba) done in" in console and "Reporting training result" not in console
    ghat_meta = finished_run.run_dir / "global_gradient" / "meta.json"
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
    assert_same_scores(report["base"], ref["base"], "base")
    for name in ("dba", "direct"):
        assert_same_scores(res[name], ref["results"][name], name)


def progress_every_second(cfg_file: str) -> str:
    """``cfg_file`` with a progress line per running trial every second (not part of a
    run's identity: the runs stay those of the finished run)."""
    tree = yaml.safe_load(Path(cfg_file).read_text())
    tree["train"]["progress_interval_s"] = 1
    Path(cfg_file).write_text(yaml.safe_dump(tree))
    return cfg_file


def assert_sweep_progress(console: str, first: str) -> None:
    """A sweep's console, killed after its first trial (``first``, as its lines name it)
    finished: lines for running trials and that trial's scores, not Tune's status table."""
    running = re.compile(r"\d\d:\d\d:\d\d dba-ray: train \S+( \(.*\))?: \d/8 steps \(\d+%\), loss \d+\.\d{4}")
    assert any(running.match(line) for line in console.splitlines()), console
    finished = re.compile(
        rf"\d\d:\d\d:\d\d dba-ray: stage 2 \({first}\) done in \d+\.\ds: "
        r"S_D \d\.\d{4}, S_G \d\.\d{4}, S \d\.\d{4}; 1 of 2 trials finished$"
    )
    assert any(finished.match(line) for line in console.splitlines()), console
    for tunes_own in ("Trial status", "Logical resource usage", "Configuration for experiment"):
        assert tunes_own not in console, console


def test_killed_compare_resumes_its_sweep(finished_run):
    # compare runs its methods as Tune trials, one at a time here: killed while the
    # second trains, the rerun restores the sweep; the first is not trained again.
    tmp_path, ref = finished_run.folder, finished_run.report
    cfg = write_run_config(tmp_path, "compare", base=finished_run, compare={"max_concurrent": 1})
    out = tmp_path / "compare"
    driver = start_killable(["compare", progress_every_second(cfg)], tmp_path / "compare.log")
    sigkill_when(driver, tmp_path / "compare.log", lambda: checkpointed(out, "dba") and checkpointed(out, "direct"))
    assert not (out / "report.json").exists()
    assert_sweep_progress((tmp_path / "compare.log").read_text(), "dba")
    ghat_meta = finished_run.run_dir / "global_gradient" / "meta.json"
    kept = ghat_meta.stat().st_mtime_ns

    assert main(["compare", cfg]) == 0
    assert ghat_meta.stat().st_mtime_ns == kept
    res = json.loads((out / "report.json").read_text())["results"]
    assert res["direct"]["resumed_at"] in (2, 4, 6)  # from its last checkpoint
    assert res["dba"]["resumed_at"] in (0, 8)  # kept, or (if Tune had not yet saved it as done) loaded and scored
    for name in ("dba", "direct"):  # the same trainings as `run`'s, so the same scores
        assert_same_scores(res[name], ref["results"][name], name)


def test_killed_stage1_resumes_from_its_checkpoint(tmp_path, caplog):
    # One worker, v_G kept: the resumed job must skip exactly the sequences its
    # checkpoint counted and cut the rest into the micro-batches an uninterrupted pass
    # has, or v_G (the squares of micro-batch means) would differ.
    gen = write_jsonl(tmp_path / "gen.jsonl", make_docs(200, seed=4))
    cfg = tiny_config(tmp_path, gen, second_moment=True, checkpoint_every_tokens=2000)
    cfg_file = tmp_path / "stage1.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(exclude_defaults=True)))
    train_runs = tmp_path / "out" / "ray_train"
    driver = start_killable(["global-gradient", str(cfg_file)], tmp_path / "killed.log")
    sigkill_when(driver, tmp_path / "killed.log", lambda: registered_runs(train_runs, "stage1-*"))
    artifact_dir = tmp_path / "out" / "global_gradient"
    assert not (artifact_dir / "meta.json").exists()

    caplog.set_level("INFO", logger="dba_ray")
    assert main(["global-gradient", str(cfg_file)]) == 0
    meta = json.loads((artifact_dir / "meta.json").read_text())
    assert 2000 <= meta["resumed_at_tokens"] < meta["tokens"]
    resumed = f"(resumed from a checkpoint at {meta['resumed_at_tokens']} tokens)"
    assert any(r.getMessage().endswith(resumed) for r in caplog.records)
    assert not any(train_runs.glob("stage1-*"))  # its checkpoints went with the artifact's commit

    ids, labels = ordered_sequences(cfg)
    ref_mean, ref_sq, ref_tokens = reference_gradients(cfg.model, ids, labels, 4)
    assert meta["tokens"] == ref_tokens and meta["sequences"] == len(ids)
    got = artifact.load(str(artifact_dir))
    assert rel_error(got.mean, ref_mean) <= 1e-6
    assert rel_error(got.second_moment, ref_sq) <= 1e-5
