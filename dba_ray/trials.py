"""Stage 2 runs as Ray Tune trials, for `dba-ray tune` (a sweep of one method's
annealing knobs, with ASHA) and `dba-ray compare` (every method × lr × seed).

Train V2 pattern: each trial is a small driver function that builds a ``TorchTrainer``
(via ``run_train``); ``TuneReportCallback`` forwards the workers' reports to Tune. A
trial's Stage 2 run lives under ``<output_dir>/<tune|compare>/trials/<trial id>``, so
re-running an interrupted sweep restores the Tune experiment and each unfinished trial
resumes its own Ray Train checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from dba_ray import console, storage, tracking
from dba_ray.config import Config, MethodSpec
from dba_ray.prepare import Prepared
from dba_ray.progress import ProgressLines, new_tracker
from dba_ray.trainer import run_train, score_summary

log = logging.getLogger("dba_ray")
_PYTHONS_UNRAISABLE_HOOK = sys.unraisablehook  # as this process had it before a trial


def _trial(params: dict, *, cfg_dump: dict, data: dict, tracking_parent, experiment: str, report_to_tune: bool) -> None:
    """One trial: a Stage 2 run of ``params`` (``{name, method, set}``) on the shared
    ``data`` (``Prepared.run_train_data()``)."""
    sys.unraisablehook = _unraisable_but_exit
    run = params.get("run", params)
    spec = MethodSpec.model_validate({**run, "set": dict(run.get("set", {}))})
    cfg = Config.model_validate(cfg_dump)
    trial_id = tune.get_context().get_trial_id()
    cfg.output_dir = storage.join(cfg.output_dir, experiment, "trials", trial_id)
    result = run_train(
        cfg,
        spec,
        **data,
        callbacks=(TuneReportCallback(),) if report_to_tune else (),
        # compare's runs have unique names; a sweep's trials share their method's name
        tracking_parent=tracking_parent,
        tracking_name=spec.name if experiment == "compare" else f"{spec.name}-{trial_id}",
        tracker=new_tracker(TrialProgress.tracker_name(trial_id)),
        in_tune_trial=True,
    )
    tune.report(
        {
            **{k: result.metrics.get(k, math.nan) for k in ("S_D", "S_G", "S")},
            "eval": result.metrics.get("eval", {}),
            "final": True,
            "tokens": result.tokens,
            "steps": result.steps,
            "run_wall_s": result.wall_s,
            "peak_mem_mb": result.peak_mem_mb,
            "resumed_at": result.resumed_at,
            "model_dir": result.model_dir,
        }
    )


def _unraisable_but_exit(unraisable) -> None:
    """When a sweep is done with a trial's actor, Ray ends its process with SIGTERM, which
    Ray's handler turns into SystemExit inside whatever runs then; when that is a
    finalizer, Python would print it as an ignored exception with a traceback (seen at the
    end of a sweep). The trial has reported already: nothing to say."""
    if not isinstance(unraisable.exc_value, SystemExit):
        _PYTHONS_UNRAISABLE_HOOK(unraisable)


def _label(trial, knobs: list[str]) -> str:
    """A trial's run name, with its values of ``knobs`` (a sweep's trials share a name)."""
    run = trial.config.get("run", trial.config)
    values = ", ".join(f"{k}={run.get('set', {}).get(k)}" for k in knobs)
    return f"{run['name']} ({values})" if values else run["name"]


class TrialProgress(tune.Callback):
    """Progress of a sweep on the driver, in `run`'s style: every ``interval_s``, a line
    per running trial (its Stage 2 step/T, loss, ETA, read from the Tracker its run
    reports to, named after the trial); a line per finished trial with its scores.
    ``knobs``: the swept keys that tell trials apart in those lines; ``total``: how many
    trials the sweep has; ``experiment_uri``: where Tune keeps the experiment (a failed
    trial's error.txt is there). A thread polls the trackers: Tune's loop never waits on them."""

    def __init__(self, interval_s: float, knobs: list[str], total: int, experiment_uri: str):
        self.interval_s, self.knobs, self.total = interval_s, knobs, total
        self.experiment_uri = experiment_uri
        self._running: dict[str, str] = {}  # trial id -> its label

    @staticmethod
    def tracker_name(trial_id: str) -> str:
        return f"dba-ray-progress-{trial_id}"

    def setup(self, **info) -> None:
        self._stop = threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        lines: dict[str, ProgressLines] = {}
        while not self._stop.wait(self.interval_s):
            for trial_id, label in list(self._running.items()):
                try:  # a trial not yet training has no tracker; a finished one no more
                    snap = ray.get(ray.get_actor(self.tracker_name(trial_id)).snapshot.remote(), timeout=30)
                except Exception:
                    continue
                if "steps_total" in snap:
                    shown = lines.setdefault(trial_id, ProgressLines(f"train {label}", snap["steps_total"], "steps"))
                    line = shown.next(snap, time.monotonic())
                    if line:
                        log.info(line)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._running[trial.trial_id] = _label(trial, self.knobs)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        label = self._running.pop(trial.trial_id, None) or _label(trial, self.knobs)
        r = trial.last_result or {}
        done = 1 + sum(t.status == "TERMINATED" for t in trials if t is not trial)  # it is still RUNNING
        how = f"done in {r['run_wall_s']:.1f}s" if r.get("final") else "stopped early (ASHA)"
        log.info("stage 2 (%s) %s: %s; %d of %d trials finished", label, how, score_summary(r), done, self.total)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        label = self._running.pop(trial.trial_id, None) or _label(trial, self.knobs)
        # Tune keeps the traceback in the trial's folder of the experiment (trial.path
        # would name it without the storage's scheme).
        where = ""
        if trial.error_file:
            where = f" (traceback: {storage.join(self.experiment_uri, Path(trial.path).name, 'error.txt')})"
        log.warning("stage 2 (%s) failed%s; the sweep goes on (its summary counts it)", label, where)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._stop.set()

    def __getstate__(self) -> dict:  # Tune pickles its callbacks (tuner.pkl): no thread
        return {k: v for k, v in self.__dict__.items() if k != "_stop"}


def run_trials(
    cfg: Config,
    param_space: dict,
    prepared: Prepared,
    *,
    name: str,
    max_concurrent: int,
    knobs: list[str],
    total: int,
    scheduler=None,
    num_samples: int = 1,
    seed: int = 0,
) -> tune.ResultGrid:
    """Run (or resume) a Tune experiment of Stage 2 trials under ``<output_dir>/<name>``;
    ``knobs``: the swept keys that tell trials apart in progress lines; ``total``: the
    number of trials."""
    # Tune moves each trial into its own directory: relative paths would follow it.
    cfg = cfg.model_copy(update={"output_dir": storage.absolute(cfg.output_dir)})
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            cfg_dump=cfg.model_dump(),
            data=prepared.run_train_data(),
            tracking_parent=tracking.current_parent(),  # trials run in other processes
            experiment=name,
            report_to_tune=scheduler is not None,
        ),
        {"CPU": 0.01},  # a trial's driver is light; its Train workers hold the CPUs
    )
    path = storage.join(cfg.output_dir, name)
    if tune.Tuner.can_restore(path):
        # A restored experiment keeps the RunConfig it was started with (callbacks and
        # verbosity included): that of this same code.
        log.info("resuming the sweep at %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                num_samples=num_samples,
                search_alg=tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent),
                # A finished trial's process runs the next one: its imports (about 9
                # CPU-s) are not paid again. Not with ASHA: a trial it stops is still
                # inside its Train run, and a reused process would fail the next trial.
                reuse_actors=scheduler is None,
            ),
            run_config=sweep_run_config(
                name,
                cfg.output_dir,
                TrialProgress(
                    cfg.train.progress_interval_s, knobs, total, storage.join(storage.absolute(cfg.output_dir), name)
                ),
            ),
        )
    return tuner.fit()


def sweep_run_config(name: str, output_dir: str, progress: TrialProgress) -> tune.RunConfig:
    """A Tune experiment's RunConfig: our progress lines, Tune's table only if verbose."""
    return tune.RunConfig(
        name=name, **storage.ray_storage(output_dir), callbacks=[progress], verbose=console.tune_verbosity()
    )


@dataclass
class TrialRow:
    """One trial's outcome (tune.json's ``trials``; compare turns it into a report row)."""

    name: str
    set: dict
    S_D: float
    S_G: float
    S: float
    status: str  # done, stopped early or error
    time_s: float
    model_dir: str | None
    eval: dict
    tokens: int | None
    steps: int | None
    wall_s: float
    peak_mem_mb: float
    resumed_at: int

    @classmethod
    def of(cls, result) -> TrialRow:
        m = result.metrics or {}
        run = result.config.get("run", result.config)
        return cls(
            name=run["name"],
            set=run.get("set", {}),
            S_D=m.get("S_D", math.nan),
            S_G=m.get("S_G", math.nan),
            S=m.get("S", math.nan),
            status="error" if result.error else ("done" if m.get("final") else "stopped early"),
            time_s=m.get("time_total_s", math.nan),
            model_dir=m.get("model_dir"),
            eval=m.get("eval", {}),
            tokens=m.get("tokens"),
            steps=m.get("steps"),
            wall_s=m.get("run_wall_s", m.get("time_total_s", math.nan)),
            peak_mem_mb=m.get("peak_mem_mb", math.nan),
            resumed_at=m.get("resumed_at", 0),
        )

    def scores(self) -> dict:
        return {"S_D": self.S_D, "S_G": self.S_G, "S": self.S, "eval": self.eval}

    def as_json(self) -> dict:
        return asdict(self)
