"""`dba-ray tune` on the session's cluster: a sweep whose trial fails, resumed, that
reports and exports the best configuration; the refusals. (Two trials, and a sweep
resumed after its driver was killed: test_recovery.)"""

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import AUTH_WARNING, console_shape, dba_ray_console, fail_once_at_step, on_finished_base
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


def split_console(console: str, out: str) -> tuple[list[str], dict[str, list[str]]]:
    """The driver's lines, and each kind of worker's (Ray prefixes those with
    ``(Kind pid=N)``; lines of different processes interleave as they arrive), shaped."""
    driver, workers = [], {}
    for line in console_shape(console, out):
        prefixed = re.match(r"\x1b\[#m\((\w+) pid=#\)\x1b\[#m ?(.*)", line)
        if prefixed:
            workers.setdefault(prefixed[1], []).append(prefixed[2])
        else:
            driver.append(line)
    return driver, workers


def test_failed_trial_resumes_then_the_sweep_reports_the_best_and_exports_it(tmp_path, finished_run):
    # The trial's worker dies at step 3, after the evaluation and checkpoint of step 2,
    # with no retries left: the sweep ends without a finished trial and says so. Run as a
    # user runs it (a cluster of its own, which inherits the failure injection).
    cfg = write_sweep(tmp_path, lrs=[3e-3], base=finished_run, max_failures=0, progress_interval_s=1)
    tree = yaml.safe_load(Path(cfg).read_text())
    tree["ray"] = {"num_cpus": 2}
    tree["tune"]["max_concurrent"] = 1
    Path(cfg).write_text(yaml.safe_dump(tree))
    out = tmp_path / "out"
    with fail_once_at_step(3):
        failed = dba_ray_console(["tune", cfg], tmp_path, returncode=2)
    (trial_dir,) = (out / "tune").glob("_trial_*")
    assert (trial_dir / "error.txt").is_file()
    first_ids = sorted(p.name for p in (out / "tune" / "trials").iterdir())
    assert len(first_ids) == 1

    # The same command again: the errored trial continues from step 2 and finishes.
    resumed = dba_ray_console(["tune", cfg], tmp_path)
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

    # The two consoles, whole: Ray's one warning, then our lines; no Tune status table,
    # no Tune traceback of the failed trial, no list of incomplete trials.
    reuse = re.sub(r"\d+", "#", f"#:#:# dba-ray: reusing the global gradient at {finished_run.run_dir}/global_gradient")
    start = [
        AUTH_WARNING,
        "#:#:# dba-ray: no validation sets: selecting on eval.sets, which then overstate the best S",
        reuse,
        "#:#:# dba-ray: tune.asha: checkpointing at every evaluation (train.checkpoint_every = #)",
    ]
    trial_warnings = [  # printed by the trial, which runs the training driver
        "dba: γ_t sits at gamma_max # for # of # steps (boost #), so those steps follow the fixed ĝ_G; train "
        "longer (T well above dba.boost), lower dba.boost, or cap dba.gamma_max",
        "dba: # of the # input-embedding rows ĝ_G moves (#.#%) belong to tokens the domain data never uses; under "
        "boost_mode: gradient AdamW steps each of them by a full lr along ĝ_G every step, which costs general "
        "ability: consider dba.boost_mode: masked or update (README, The vocabulary warning)",
    ]
    driver, workers = split_console(failed, str(out))
    resources = driver.pop(1)
    assert resources.startswith("#:#:# dba-ray: Ray cluster resources: {"), failed
    trial_dir_shaped = console_shape(str(trial_dir), str(out))[0]
    assert driver == [
        *start,
        f"#:#:# dba-ray: stage # (dba (schedule.lr=#.#)) failed (traceback: {trial_dir_shaped}/error.txt); "
        "the sweep goes on (its summary counts it)",
        "dba-ray: error: no trial finished (# errored; first error: RuntimeError: injected failure at step # "
        "(DBA_RAY_FAULTS)); re-run the same command to resume",
    ], failed
    assert set(workers) == {"_trial", "RayTrainWorker"} and workers["_trial"] == trial_warnings, failed
    # The worker's own error report (a worker's error reaches the console).
    error = workers["RayTrainWorker"]
    assert error[:2] == ["Error in training function:", "Traceback (most recent call last):"], failed
    assert error[-2:] == ["RuntimeError: injected failure at step # (DBA_RAY_FAULTS)", ""], failed
    assert all(line.startswith("  ") for line in error[2:-2]), failed

    driver, workers = split_console(resumed, str(out))
    resources = driver.pop(1)
    assert resources.startswith("#:#:# dba-ray: Ray cluster resources: {"), resumed
    assert driver == [
        *start,
        "#:#:# dba-ray: resuming the sweep at OUT/tune",
        "#:#:# dba-ray: train dba (schedule.lr=#.#): #/# steps (#%), loss #.#",
        "#:#:# dba-ray: stage # (dba (schedule.lr=#.#)) done in #.#s: S_D #.#, S_G #.#, S #.#; # of # trials finished",
        "| trial | schedule.lr | S_D | S_G | S | time s | status |",
        "|---|---|---|---|---|---|---|",
        "| # | #.# | #.# | #.# | #.# | # | done |",
        "",
        "Best (S #.# on the validation sets): schedule.lr=#.#; model exported to OUT/best/model",
        "",
    ], resumed
    assert workers == {"_trial": trial_warnings, "RayTrainWorker": ["rank # resumed at step #"]}, resumed


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
