"""Training curves of a Stage 2 run: every step's loss, lr, γ_t, cos, c_t, seconds and every
evaluation, kept as ``curves.jsonl`` and as TensorBoard event files in the run folder.

Written by a Ray Train callback on the Train controller, from the reports the workers
already send (each carries the steps since the previous one), so curves cost the
training loop nothing.
"""

from __future__ import annotations

import json
import math
import os

from ray.train import UserCallback
from tensorboardX import SummaryWriter

from dba_ray import storage

CURVES = "curves.jsonl"
STEP_KEYS = ("loss", "lr", "gamma", "cos", "c", "norm_d", "norm_b", "step_s")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def eval_row(step: int, metrics: dict) -> dict:
    row = {"kind": "eval", "step": step}
    for key in ("S_D", "S_G", "S"):
        if key in metrics:
            row[key] = metrics[key]
    for name, m in metrics.get("eval", {}).items():
        for k, v in m.items():
            if k != "records":  # a per_record set's sums: report.json's, not a curve's
                row[f"{name}/{k}"] = v
    return row


def report_rows(m: dict) -> tuple[int, list[dict]]:
    """(first step, curve rows) of one report of rank 0: its steps, then its evaluation."""
    history = m.get("history", [])
    first = history[0]["step"] if history else m.get("step", 0)
    rows = [{"kind": "train", **{k: h[k] for k in ("step", *STEP_KEYS) if k in h}} for h in history]
    if "S" in m:
        rows.append(eval_row(m["step"], m))
    return first, rows


def row_scalars(row: dict) -> dict[str, float]:
    """A curve row as named scalars (``train/loss``, ``eval/S``, ``eval/<set>/acc``): the
    names in TensorBoard and in the trackers."""
    return {f"{row['kind']}/{k}": v for k, v in row.items() if k not in ("kind", "step") and _finite(v)}


class CurvesCallback(UserCallback):
    """Appends each report's steps and evaluation to the run's curves.

    A local curves.jsonl is appended to, so a report costs what it adds. Object stores
    cannot append: there the file is rewritten whole at every report. Steps a resumed
    run repeats are appended again and replace the earlier ones when read."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = storage.join(run_dir, CURVES)
        self.rows: list[dict] | None = None  # object stores only: the file's content
        self._started = False
        self._writer = None

    def _start(self, first_step: int) -> None:
        self._started = True
        if storage.is_remote(self.run_dir):
            self.rows = read_curves(self.run_dir)
            return
        _drop_torn_line(self.path)
        self._writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"), purge_step=first_step)

    def after_report(self, run_context, metrics, checkpoint):
        first, new = report_rows(metrics[0])  # rank 0's report
        if not self._started:
            self._start(first)
        if self._writer is not None:
            for row in new:
                for k, v in row_scalars(row).items():
                    self._writer.add_scalar(k, v, row["step"])
            self._writer.flush()
        text = "".join(json.dumps(r) + "\n" for r in new)
        if self.rows is None:
            with open(self.path, "a") as f:  # one write: a crash tears at most this report
                f.write(text)
        else:
            self.rows = _latest(self.rows + new)
            data = "".join(json.dumps(r) + "\n" for r in self.rows)
            storage.write_bytes_atomic(self.path, data.encode())


def _drop_torn_line(path: str) -> None:
    """Cut a last line a killed writer left unfinished, so appends start on a new line."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _latest(rows: list[dict]) -> list[dict]:
    """Rows as the run finally went: when a resumed run reports step s again, it
    replaces every row from step s on that the interrupted attempt wrote."""
    out: list[dict] = []
    last = 0
    for r in rows:
        if r["kind"] == "train":
            if r["step"] <= last:
                out = [o for o in out if o["step"] < r["step"]]
            last = r["step"]
        out.append(r)
    return out


def read_curves(run_dir: str) -> list[dict]:
    path = storage.join(run_dir, CURVES)
    if not storage.exists(path):
        return []
    text = storage.read_bytes(path).decode()
    lines = text.split("\n")[:-1]  # a last line without its newline is being written
    return _latest([json.loads(line) for line in lines if line])
