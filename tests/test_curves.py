"""curves.jsonl (no Ray): appended per report, and a resumed run's repeated steps
replace the interrupted attempt's when read."""

import os

from dba_ray.curves import CURVES, CurvesCallback, read_curves


def report(cb: CurvesCallback, steps, eval_at=None):
    history = [{"step": s, "loss": 10.0 - s, "lr": 0.1, "gamma": 0.5, "c": 1.0} for s in steps]
    m = {"step": steps[-1], "history": history}
    if eval_at is not None:
        m.update({"S": 0.5, "S_D": 0.5, "S_G": 0.5, "eval": {"ev": {"nll": 2.0}}})
    cb.after_report(None, [m], None)


def test_curves_are_appended_not_rewritten(tmp_path):
    cb = CurvesCallback(str(tmp_path))
    report(cb, [1, 2], eval_at=2)
    path = tmp_path / CURVES
    inode, first = os.stat(path).st_ino, path.read_bytes()
    for s in range(3, 41, 2):
        report(cb, [s, s + 1])
    # The same file, grown at its end: each report writes only its own rows (rewriting
    # the whole file per report is quadratic in the run's length).
    assert os.stat(path).st_ino == inode and path.read_bytes().startswith(first)
    rows = read_curves(str(tmp_path))
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 41))
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    cb = CurvesCallback(str(tmp_path))
    report(cb, [1, 2], eval_at=2)
    report(cb, [3, 4], eval_at=4)
    with open(tmp_path / CURVES, "a") as f:
        f.write('{"kind": "train", "st')  # a driver killed mid-write
    # A new driver (or a worker group restarted) resumes from the step-2 checkpoint.
    cb = CurvesCallback(str(tmp_path))
    report(cb, [3, 4, 5], eval_at=5)
    rows = read_curves(str(tmp_path))
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("train", 3),
        ("train", 4),
        ("train", 5),
        ("eval", 5),
    ]
