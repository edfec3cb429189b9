"""Experiment tracking in MLflow and Weights & Biases (the ``tracking`` section).

One tracked run per Stage 1 job, per Stage 2 run (``train``, each method of ``run``,
each run of ``compare``, each ``tune`` trial) and per ``run`` / ``compare`` / ``tune``
command. A command's runs share a group: the W&B group, and in MLflow the tag
``dba_ray.group`` plus nesting under the command's run (``mlflow.parentRunId``).

Each tracked run lives in a small Ray actor of its own, opened with Ray's integrations
(``ray.air.integrations.mlflow.setup_mlflow``, ``ray.air.integrations.wandb.setup_wandb``):
both keep one active run per process, and W&B must log and finish a run from the
process that started it. Stage 2's per-step curves reach the actor from a Ray Train
callback on the Train controller (the same reports ``curves.jsonl`` is written from),
while the training loop runs; the run's final scores follow from the driver. Metric
names are those of TensorBoard: ``train/loss``, ``eval/S``, ``eval/<set>/acc``; the
final scores (lm_eval sets included) are ``final/...``.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass

import ray
from ray.train import UserCallback

from dba_ray import storage
from dba_ray.artifact import ArtifactMeta
from dba_ray.config import Config, TrackingConfig, flatten
from dba_ray.curves import report_rows, row_scalars
from dba_ray.errors import UserError
from dba_ray.ray_runtime import ensure_ray

# MLflow allows these characters in metric and parameter names.
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
_PARAM_MAX = 500  # characters of a parameter's value (MLflow refuses very long ones)


@dataclass
class TrackingParent:
    """What a command's runs share, passed to Tune trials in other processes."""

    group: str
    mlflow_run_id: str | None  # the command's MLflow run, parent of the others
    wandb_dir: str | None


_CURRENT: contextvars.ContextVar[TrackingParent | None] = contextvars.ContextVar("dba_ray_tracking", default=None)


def current_parent() -> TrackingParent | None:
    return _CURRENT.get()


def _require(tc: TrackingConfig) -> None:
    missing = []
    if tc.mlflow is not None:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            missing.append("mlflow")
    if tc.wandb is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            missing.append("wandb")
    if missing:
        raise UserError(f"tracking needs {' and '.join(missing)}: pip install 'dba-ray[tracking]'")


def scalars(tree: dict, prefix: str) -> dict[str, float]:
    """Every finite number in a nested dict, as ``prefix/a/b`` names."""
    out = {}
    for key, value in flatten(tree).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[_UNSAFE.sub("_", f"{prefix}/{key.replace('.', '/')}")] = float(value)
    return out


def _params(cfg_dump: dict) -> dict[str, str]:
    out = {}
    for key, value in flatten(cfg_dump).items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[_UNSAFE.sub("_", key)] = text[:_PARAM_MAX]
    return out


@ray.remote(num_cpus=0)
class _RunActor:
    """One tracked run, in MLflow and/or W&B, opened and finished in this process."""

    def __init__(self, tc: dict, name: str, kind: str, parent: TrackingParent, config: dict):
        tc = TrackingConfig.model_validate(tc)
        self._mlflow = self._wandb = None
        tags = {"dba_ray.group": parent.group, "dba_ray.kind": kind}
        if tc.mlflow is not None:
            from ray.air.integrations.mlflow import setup_mlflow

            if parent.mlflow_run_id:
                tags["mlflow.parentRunId"] = parent.mlflow_run_id
            uri = tc.mlflow.tracking_uri or ""
            if uri.startswith("file:") or (uri and "://" not in uri):
                # MLflow 3 keeps its file store in maintenance mode behind this switch; a
                # file tracking_uri in the config is the user asking for it.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self._mlflow = setup_mlflow(
                config=_params(config),
                tracking_uri=tc.mlflow.tracking_uri,
                experiment_name=tc.mlflow.experiment,
                run_name=name,
                create_experiment_if_not_exists=True,
                tags=tags,
                rank_zero_only=False,
            )
        if tc.wandb is not None:
            from ray.air.integrations.wandb import setup_wandb

            w = tc.wandb
            # Ray's helper asks for an API key unless the mode is in the environment.
            os.environ["WANDB_MODE"] = w.mode
            os.environ.setdefault("WANDB_SILENT", "true")
            wdir = w.dir or parent.wandb_dir
            if wdir:
                os.makedirs(wdir, exist_ok=True)
            self._wandb = setup_wandb(
                config=config,
                project=w.project,
                entity=w.entity,
                group=parent.group,
                job_type=kind,
                trial_id=uuid.uuid4().hex[:8],
                trial_name=name,
                dir=wdir,
                mode=w.mode,
                resume="allow",
                reinit="create_new",
                tags=[kind],
                rank_zero_only=False,
            )

    def ids(self) -> dict:
        return {
            "mlflow": self._mlflow.active_run().info.run_id if self._mlflow else None,
            "wandb": self._wandb.id if self._wandb else None,
            "wandb_dir": self._wandb.dir if self._wandb else None,
        }

    def log(self, batches: list[tuple[dict[str, float], int | None]]) -> None:
        for values, step in batches:
            if not values:
                continue
            if self._mlflow:
                self._mlflow.log_metrics(values, step=step)
            if self._wandb:
                if step is None:
                    self._wandb.summary.update(values)
                else:
                    self._wandb.log(values, step=step)

    def summary(self, values: dict[str, float]) -> None:
        """Final values: MLflow metrics without a step, W&B run summary."""
        if self._mlflow:
            self._mlflow.log_metrics(values)
        if self._wandb:
            self._wandb.summary.update(values)

    def files(self, paths: list[str]) -> None:
        for path in paths:
            if self._mlflow:
                self._mlflow.log_artifact(path)
            if self._wandb:
                self._wandb.save(path, base_path=os.path.dirname(path), policy="now")

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        if self._mlflow:
            self._mlflow.log_dict({"columns": columns, "rows": rows}, f"{name}.json")
        if self._wandb:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=rows)})

    def finish(self, ok: bool) -> None:
        if self._mlflow:
            self._mlflow.end_run(status="FINISHED" if ok else "FAILED")
        if self._wandb:
            import wandb

            self._wandb.finish(exit_code=0 if ok else 1)
            # The actor is killed next: wait until W&B's service has written everything.
            wandb.teardown()


class TrackedRun:
    """The driver's handle on one tracked run; every call waits for the tracker, so the
    order of what is logged is the order of the calls."""

    def __init__(self, cfg: Config, name: str, kind: str, parent: TrackingParent | None, config: dict):
        _require(cfg.tracking)
        self.parent = parent or TrackingParent(
            group=_group_name(cfg, kind), mlflow_run_id=None, wandb_dir=_wandb_dir(cfg)
        )
        self.actor = _RunActor.remote(cfg.tracking.model_dump(), name, kind, self.parent, config)
        try:
            self.ids = ray.get(self.actor.ids.remote())
        except ray.exceptions.RayActorError as e:
            # e.g. an MLflow server that does not answer, or W&B online without a login
            cause = str(getattr(e, "cause", None) or e).strip().splitlines()
            raise UserError(f"tracking: cannot open run {name!r}: {cause[-1] if cause else e}") from None
        self._open = True

    def log(self, batches: list[tuple[dict[str, float], int | None]]) -> None:
        ray.get(self.actor.log.remote(batches))

    def summary(self, values: dict[str, float]) -> None:
        ray.get(self.actor.summary.remote(values))

    def files(self, paths: list[str]) -> None:
        local = [p for p in paths if not storage.is_remote(p) and os.path.exists(p)]
        if local:
            ray.get(self.actor.files.remote(local))

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        ray.get(self.actor.table.remote(name, columns, rows))

    def finish(self, ok: bool = True) -> None:
        if self._open:
            self._open = False
            ray.get(self.actor.finish.remote(ok))
            ray.kill(self.actor)

    def child_parent(self) -> TrackingParent:
        """The parent that this (command) run's children point to."""
        return TrackingParent(self.parent.group, self.ids["mlflow"], self.parent.wandb_dir)


def _group_name(cfg: Config, command: str) -> str:
    if cfg.tracking.group:
        return cfg.tracking.group
    leaf = os.path.basename(storage.absolute(cfg.output_dir).rstrip("/")) or "dba"
    return f"{command}-{leaf}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _wandb_dir(cfg: Config) -> str | None:
    out = storage.absolute(cfg.output_dir)
    return None if storage.is_remote(out) else out


def open_run(cfg: Config, name: str, kind: str, parent: TrackingParent | None = None) -> TrackedRun | None:
    """A tracked run of ``cfg`` (None when ``tracking`` is absent), in the group of
    ``parent`` or of the command this driver is running."""
    if cfg.tracking is None:
        return None
    return TrackedRun(cfg, name, kind, parent or current_parent(), cfg.model_dump(exclude={"tracking"}))


class TrackingCallback(UserCallback):
    """Forwards each report's steps and evaluation to a Stage 2 run's tracker, from the
    Train controller, as the run goes."""

    def __init__(self, actor):
        self.actor = actor

    def after_report(self, run_context, metrics, checkpoint):
        _, rows = report_rows(metrics[0])
        ray.get(self.actor.log.remote([(row_scalars(row), row["step"]) for row in rows]))


def final_values(result_row: dict) -> dict[str, float]:
    """A run's row of report.json (or a finished Stage 2 run's metrics) as ``final/...``."""
    keep = {
        k: v
        for k, v in result_row.items()
        if k in ("S_D", "S_G", "S", "eval", "wall_s", "tokens", "steps", "peak_mem_mb")
    }
    return scalars(keep, "final")


def log_stage1(cfg: Config, meta: ArtifactMeta, wall_s: float) -> None:
    """The Stage 1 job as its own tracked run: its settings, what it saw, ĝ_G's identity."""
    run = open_run(cfg, "stage1", "stage1")
    if run is None:
        return
    run.summary(
        scalars(
            {
                "tokens": meta.tokens,
                "sequences": meta.sequences,
                "mean_loss": meta.mean_loss,
                "global_norm": meta.global_norm,
                "wall_s": wall_s,
            },
            "stage1",
        )
    )
    run.table(
        "global_gradient",
        ["param_fingerprint", "data_fingerprint", "created_at"],
        [[meta.param_fingerprint, meta.data_fingerprint, meta.created_at]],
    )
    run.finish()


def report_table(report: dict) -> tuple[list[str], list[list]]:
    """report.json as one table: a row per model, S_D / S_G / S, each set's score, costs."""
    sets = list(report["base"]["eval"])
    columns = ["run", "S_D", "S_G", "S", *(f"{s} acc" for s in sets), "tokens", "wall_s", "total_cost_tokens"]
    rows = []
    for name, r in [("base", report["base"]), *report["results"].items()]:
        rows.append(
            [
                name,
                r["S_D"],
                r["S_G"],
                r["S"],
                *(r["eval"][s]["acc"] for s in sets),
                r.get("tokens"),
                r.get("wall_s"),
                r.get("cost", {}).get("total_tokens"),
            ]
        )
    return columns, rows


def tracked_command(command: str):
    """Decorator for ``run_all`` / ``run_compare`` / ``run_tune(cfg)``: the command is one
    tracked run that groups every run it starts; at the end it gets the report (table,
    each run's scores and costs as ``<run>/...``) and the files of ``OUTPUT_FILES`` it
    wrote (report.md / report.json, the PNGs, tune.md / tune.json / best.yaml)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(cfg: Config, *args, **kwargs):
            if cfg.tracking is None or current_parent() is not None:
                return fn(cfg, *args, **kwargs)
            ensure_ray(cfg.ray)
            run = open_run(cfg, command, command)
            token = _CURRENT.set(run.child_parent())
            ok, started = False, time.time()
            try:
                out = fn(cfg, *args, **kwargs)
                out_dir = storage.absolute(cfg.output_dir)
                if isinstance(out, dict) and "results" in out and "base" in out:
                    _log_report(run, out)
                # What this command wrote (not what an earlier command left there).
                written = [storage.join(out_dir, n) for n in OUTPUT_FILES]
                run.files([p for p in written if os.path.exists(p) and os.path.getmtime(p) >= started])
                ok = True
                return out
            finally:
                _CURRENT.reset(token)
                run.finish(ok)

        return inner

    return wrap


# A command's outputs in output_dir that its tracked run keeps.
OUTPUT_FILES = ("report.md", "report.json", "frontier.png", "dba_curves.png", "tune.md", "tune.json", "best.yaml")


def _log_report(run: TrackedRun, report: dict) -> None:
    values = scalars({k: report["base"][k] for k in ("S_D", "S_G", "S", "eval")}, "base")
    for name, r in report["results"].items():
        keep = {k: r[k] for k in ("S_D", "S_G", "S", "eval", "delta", "tokens", "wall_s", "cost") if k in r}
        values.update(scalars(keep, name))
    run.summary(values)
    run.table("report", *report_table(report))
