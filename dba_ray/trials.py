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
from dataclasses import asdict, dataclass

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from dba_ray import storage, tracking
from dba_ray.config import Config, MethodSpec
from dba_ray.prepare import Prepared
from dba_ray.trainer import run_train

log = logging.getLogger("dba_ray")


def _trial(params: dict, *, cfg_dump: dict, data: dict, tracking_parent, experiment: str, report_to_tune: bool) -> None:
    """One trial: a Stage 2 run of ``params`` (``{name, method, set}``) on the shared
    ``data`` (``Prepared.run_train_data()``)."""
    run = params.get("run", params)
    spec = MethodSpec.model_validate({**run, "set": dict(run.get("set", {}))})
    cfg = Config.model_validate(cfg_dump)
    cfg.output_dir = storage.join(cfg.output_dir, experiment, "trials", tune.get_context().get_trial_id())
    result = run_train(
        cfg,
        spec,
        **data,
        callbacks=(TuneReportCallback(),) if report_to_tune else (),
        # compare's runs have unique names; a sweep's trials share their method's name
        tracking_parent=tracking_parent,
        tracking_name=spec.name if experiment == "compare" else f"{spec.name}-{tune.get_context().get_trial_id()}",
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


def run_trials(
    cfg: Config,
    param_space: dict,
    prepared: Prepared,
    *,
    name: str,
    max_concurrent: int,
    scheduler=None,
    num_samples: int = 1,
    seed: int = 0,
) -> tune.ResultGrid:
    """Run (or resume) a Tune experiment of Stage 2 trials under ``<output_dir>/<name>``."""
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
            ),
            run_config=tune.RunConfig(name=name, **storage.ray_storage(cfg.output_dir)),
        )
    return tuner.fit()


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
