"""`dba-ray tune` on the session's cluster: a sweep whose trial fails, resumed, that
reports and exports the best configuration; the refusals. (A sweep restored after its
driver was killed: test_recovery's `compare`, which restores through the same code.)"""

import json

import pytest
import yaml
from conftest import fail_once_at_step, on_finished_base
from test_compare import tiny_tree

from dba_ray.cli import main

pytestmark = pytest.mark.usefixtures("ray_cluster")


def write_sweep(tmp_path, lrs=(3e-3, 3e-4), base=None, **train) -> str:
    """A dba sweep of tiny_tree's run; with ``base`` (a finished run), on its base model
    and ĝ_G."""
    tree = tiny_tree(tmp_path) if base is None else on_finished_base(tiny_tree(tmp_path), base)
    tree["train"].update({"eval_every": 2, **train})
    tree["tune"] = {"search": {"schedule.lr": list(lrs)}, "grace_evals": 1}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_failed_trial_resumes_then_the_sweep_reports_the_best_and_exports_it(tmp_path, capsys, caplog, finished_run):
    # The trial's worker dies at step 3, after the evaluation and checkpoint of step 2,
    # with no retries left: the sweep ends without a finished trial and says so, in one
    # line, after ours that names the trial and where its traceback is kept.
    cfg = write_sweep(tmp_path, lrs=[3e-3], base=finished_run, max_failures=0)
    out = tmp_path / "out"
    caplog.set_level("INFO", logger="dba_ray")
    with fail_once_at_step(3):
        assert main(["tune", cfg]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "dba-ray: error: no trial finished (1 errored; first error: RuntimeError: injected failure at step 3 "
        "(DBA_RAY_FAULTS)); re-run the same command to resume"
    )
    (trial_dir,) = (out / "tune").glob("_trial_*")
    failed = [r.getMessage() for r in caplog.records if " failed (traceback: " in r.getMessage()]
    assert failed == [
        f"stage 2 (dba (schedule.lr=0.003)) failed (traceback: {trial_dir}/error.txt); the sweep goes on "
        "(its summary counts it)"
    ]
    assert "RuntimeError: injected failure at step 3" in (trial_dir / "error.txt").read_text()
    first_ids = sorted(p.name for p in (out / "tune" / "trials").iterdir())
    assert len(first_ids) == 1

    # The same command again: the errored trial continues from step 2 and finishes.
    assert main(["tune", cfg]) == 0
    summary = json.loads((out / "tune.json").read_text())
    trials = summary["trials"]
    assert [t["set"]["schedule.lr"] for t in trials] == [3e-3]
    done = [t for t in trials if t["status"] == "done"]
    assert done and all(t["resumed_at"] == 2 for t in done)
    assert sorted(p.name for p in (out / "tune" / "trials").iterdir()) == first_ids

    best = summary["best"]
    assert best["S"] == max(t["S"] for t in done)
    assert (out / "best" / "model" / "config.json").is_file()
    best_spec = yaml.safe_load((out / "best.yaml").read_text())["methods"][0]
    assert best_spec["name"] == "dba-best" and best_spec["set"]["schedule.lr"] == best["set"]["schedule.lr"]
    printed = capsys.readouterr().out
    assert "| trial | schedule.lr | S_D | S_G | S |" in printed and "Best (S " in printed


def test_a_mixture_ratio_is_refused_in_a_dba_sweep(tmp_path, capsys):
    cfg = write_sweep(tmp_path)
    assert main(["tune", cfg, "--set", "tune.search.mixture.ratio=[0.1, 0.3]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a knob of dba" in err and "domain data only" in err
    assert main(["tune", cfg, "--set", "tune.search.train.epochs=[1, 2]"]) == 2
    assert "not a Stage 2 annealing knob" in capsys.readouterr().err
    # Bad values fail at once, in one line, before any trial runs.
    assert main(["tune", cfg, "--set", "tune.search.dba.boost={loguniform: [0, 10]}"]) == 2
    assert "loguniform needs 0 < lo < hi" in capsys.readouterr().err
    assert main(["tune", cfg, "--set", "tune.search.dba.dc=[norm, bogus]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "dba.dc" in err
    assert not (tmp_path / "out" / "tune").exists()
