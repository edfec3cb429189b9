"""`dba-ray tune` on the session's cluster: a 2-trial sweep that reports the best
configuration, a sweep that is interrupted and resumed, and the refusals."""

import json

import pytest
import yaml

from dba_ray.cli import main
from test_compare import tiny_tree

pytestmark = pytest.mark.usefixtures("ray_cluster")


def write_sweep(tmp_path, **train) -> str:
    tree = tiny_tree(tmp_path)
    tree["train"].update({"eval_every": 2, **train})
    tree["tune"] = {"search": {"schedule.lr": [3e-3, 3e-4]}, "grace_evals": 1}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_two_trial_sweep_reports_the_best_and_exports_its_model(tmp_path, capsys):
    cfg = write_sweep(tmp_path)
    assert main(["tune", cfg]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "tune.json").read_text())
    trials = summary["trials"]
    assert sorted(t["set"]["schedule.lr"] for t in trials) == [3e-4, 3e-3]
    done = [t for t in trials if t["status"] == "done"]
    best = summary["best"]
    assert best["S"] == max(t["S"] for t in done)
    assert (out / "best" / "model" / "config.json").is_file()
    assert yaml.safe_load((out / "best.yaml").read_text())["methods"][0]["set"]["schedule.lr"] == best["set"]["schedule.lr"]
    printed = capsys.readouterr().out
    assert "| trial | schedule.lr | S_D | S_G | S |" in printed and "Best (S " in printed


def test_interrupted_sweep_resumes_each_trial_from_its_checkpoint(tmp_path):
    # Every trial's worker dies at step 3, after the checkpoint of step 2, with no
    # retries left: the sweep ends with errored trials and says how to resume.
    cfg = write_sweep(tmp_path, fail_once_at_step=3, max_failures=0)
    assert main(["tune", cfg, "--set", "tune.asha=false"]) == 2
    trials_dir = tmp_path / "out" / "tune" / "trials"
    first_ids = sorted(p.name for p in trials_dir.iterdir())
    assert len(first_ids) == 2
    # The same command again: the same trials continue at step 2 and finish.
    assert main(["tune", cfg, "--set", "tune.asha=false"]) == 0
    summary = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["done", "done"]
    assert [t["resumed_at"] for t in summary["trials"]] == [2, 2]
    assert sorted(p.name for p in trials_dir.iterdir()) == first_ids


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
