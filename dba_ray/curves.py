"""Training curves of a Stage 2 run: every step's loss, lr, γ_t, cos, c_t and every
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

from dba_ray import storage

CURVES = "curves.jsonl"
STEP_KEYS = ("loss", "lr", "gamma", "cos", "c", "norm_d", "norm_b")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def eval_row(step: int, metrics: dict) -> dict:
    row = {"kind": "eval", "step": step}
    for key in ("S_D", "S_G", "S"):
        if key in metrics:
            row[key] = metrics[key]
    for name, m in metrics.get("eval", {}).items():
        for k, v in m.items():
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
    """Appends each report's steps and evaluation to the run's curves."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.rows: list[dict] | None = None
        self._writer = None

    def _load(self, first_step: int) -> None:
        # A resumed run continues the file (after_report drops what it repeats).
        self.rows = read_curves(self.run_dir)
        if not storage.is_remote(self.run_dir):
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"), purge_step=first_step)

    def after_report(self, run_context, metrics, checkpoint):
        first, new = report_rows(metrics[0])  # rank 0's report
        if self.rows is None:
            self._load(first)
        # After a worker failure Train resumes from the last checkpoint: steps after it
        # come again and replace the ones the failed attempt reported.
        self.rows = [r for r in self.rows if r["step"] < first]
        self.rows.extend(new)
        if self._writer is not None:
            for row in new:
                for k, v in row_scalars(row).items():
                    self._writer.add_scalar(k, v, row["step"])
            self._writer.flush()
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        storage.write_bytes_atomic(storage.join(self.run_dir, CURVES), text.encode())


def read_curves(run_dir: str) -> list[dict]:
    path = storage.join(run_dir, CURVES)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line]
