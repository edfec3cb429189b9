"""`dba-ray tune`: a Ray Tune sweep of one method's Stage 2 annealing knobs (with
ASHA), each trial a Stage 2 run (dba_ray/trials.py), or a sweep of the merge knob on a
finished run, each trial one evaluation."""

from __future__ import annotations

import json
import logging
import math
import time

import ray
import torch
import yaml
from ray import tune

from dba_ray import preflight, storage, tracking
from dba_ray.config import Config, MergeConfig, MethodSpec, flatten
from dba_ray.data.arrays import EvalData, tokenize_eval
from dba_ray.errors import UserError, one_line
from dba_ray.evaluate import score_sets
from dba_ray.merge_curves import (
    EvalGroups,
    curve_points,
    domain_fisher,
    export_merge,
    general_fisher_uri,
    merged_model,
    submit_curve,
)
from dba_ray.methods import config_for_run, uses_global_gradient
from dba_ray.prepare import Prepared, ensure_base_model, prepare
from dba_ray.ray_runtime import ensure_ray
from dba_ray.scoring import evaluate_models
from dba_ray.trials import TrialProgress, TrialRow, run_trials, sweep_run_config

log = logging.getLogger("dba_ray")

# Stage 2's annealing knobs: what a sweep may touch (keys under `train`).
SEARCHABLE = {
    "schedule.lr",
    "schedule.anneal",
    "schedule.shape",
    "schedule.warmup_ratio",
    "schedule.min_lr_ratio",
    "schedule.decay_ratio",
    "dba.ggb",
    "dba.boost",
    "dba.gamma_max",
    "dba.dc",
    "dba.kappa",
    "dba.c_max",
    "dba.fisher_lambda",
}
_DOMAINS = {"choice": tune.choice, "uniform": tune.uniform, "loguniform": tune.loguniform}


def search_space(cfg: Config) -> tuple[dict, dict[str, list]]:
    """``tune.search`` as Tune domains, plus every concrete value each key can take (grid
    values, choices, bounds), each checked against the config before any trial starts."""
    tc = cfg.tune
    method = tc.method.method
    space, values = {}, {}
    for key, value in flatten(tc.search, keep=_is_domain).items():
        if key.startswith("mixture.") and method != "mixture":
            raise UserError(
                f"tune.search.{key}: a data-mixture ratio is not a knob of {method}. DBA trains "
                "on domain data only; general data enters once, through ĝ_G. To price the "
                "mixture baseline's ratio search, sweep method: mixture or use compare.mixture_ratios"
            )
        if key not in SEARCHABLE and not (method == "mixture" and key == "mixture.ratio"):
            raise UserError(
                f"tune.search.{key} is not a Stage 2 annealing knob; allowed: {', '.join(sorted(SEARCHABLE))}"
                + (", mixture.ratio" if method == "mixture" else "")
            )
        kind, args = (
            ("grid", value)
            if isinstance(value, list)
            else next(iter(value.items()))
            if _is_domain(value)
            else (None, None)
        )
        if kind in ("uniform", "loguniform"):
            try:
                lo, hi = (float(a) for a in args)  # YAML reads 1e-5 as a string
            except (TypeError, ValueError):
                raise UserError(f"tune.search.{key}: {kind} needs [lo, hi] numbers (got {args!r})") from None
            if not lo < hi or (kind == "loguniform" and lo <= 0):
                raise UserError(
                    f"tune.search.{key}: {kind} needs 0 {'<' if kind == 'loguniform' else '<='} lo < hi (got {args!r})"
                )
            space[key], values[key] = _DOMAINS[kind](lo, hi), [lo, hi]
        elif kind in ("grid", "choice") and isinstance(args, list) and args:
            space[key] = tune.grid_search(args) if kind == "grid" else tune.choice(args)
            values[key] = args
        else:
            raise UserError(
                f"tune.search.{key}: give a non-empty list (grid) or one of {{choice: [...]}}, "
                f"{{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}} (got {value!r})"
            )
    if not space:
        raise UserError("tune.search is empty: name at least one knob to sweep")
    for key, candidates in values.items():
        for v in candidates:  # a bad value fails here, in one line, not in every trial
            config_for_run(cfg, tc.method.model_copy(update={"set": {**tc.method.set, key: v}}))
    return space, values


def _is_domain(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _DOMAINS


def _prepare_sweep(cfg: Config, spec: MethodSpec, values: dict[str, list]) -> Prepared:
    """Data and ĝ_G every trial shares, made once (``cfg.eval.sets``: the sets trials
    are selected on)."""
    t = config_for_run(cfg, spec).train
    mixtures = []
    if spec.method == "mixture":
        swept = [
            t.model_copy(update={"mixture": t.mixture.model_copy(update={"ratio": float(r)})})
            for r in values.get("mixture.ratio", [])
        ]
        mixtures = [t, *swept]
    # A dba sweep may switch GGB, DC or the anchor on in any trial.
    stage1 = spec.method == "dba" or uses_global_gradient(t.dba)
    return prepare(cfg, mixtures=mixtures, stage1=stage1, validation=False)


@tracking.tracked_command("tune")
def run_tune(cfg: Config) -> dict:
    """`dba-ray tune`: sweep, then a table of trials and the best configuration, whose
    model is exported to ``<output_dir>/best/model``."""
    tc = cfg.tune
    keys = set(flatten(tc.search, keep=_is_domain))
    if MERGE_KNOB in keys:
        if keys != {MERGE_KNOB}:
            raise UserError(
                f"tune.search: {MERGE_KNOB} is swept on a finished run, alone (no training); "
                f"sweep {sorted(keys - {MERGE_KNOB})} in another sweep"
            )
        return run_merge_sweep(cfg)
    space, values = search_space(cfg)
    if tc.asha and cfg.train.eval_every == 0:
        raise UserError("tune.asha needs train.eval_every > 0 (ASHA compares trials at evaluations)")
    validation = tc.validation_sets or cfg.eval.validation_sets
    if not cfg.eval.sets and not validation:
        raise UserError("dba-ray tune needs tune.validation_sets (or eval.sets) to measure S on")
    preflight.check(cfg, [tc.method], concurrent=("tune.max_concurrent", tc.max_concurrent))
    ensure_ray(cfg.ray)
    start = time.monotonic()
    # The base model first, while eval.sets are still the sets pretraining evaluates on.
    cfg = ensure_base_model(cfg)
    test_sets = cfg.eval.sets
    if validation:
        cfg.eval.sets = validation
    else:
        log.warning("no validation sets: selecting on eval.sets, which then overstate the best S")
    prepared = _prepare_sweep(cfg, tc.method, values)
    scheduler = _asha(cfg) if tc.asha else None
    param_space = {"name": tc.method.name, "method": tc.method.method, "set": {**tc.method.set, **space}}
    grid = run_trials(
        cfg,
        param_space,
        prepared,
        name="tune",
        max_concurrent=tc.max_concurrent,
        knobs=list(space),
        total=tc.num_samples
        * math.prod(len(v) for v in flatten(tc.search, keep=_is_domain).values() if isinstance(v, list)),
        scheduler=scheduler,
        num_samples=tc.num_samples,
        seed=tc.seed,
    )
    rows = [TrialRow.of(r) for r in grid]
    errors = [r for r in rows if r.status == "error"]
    done = [r for r in rows if r.status == "done" and not math.isnan(r.S)]
    if not done:
        first = next((r.error for r in grid if r.error), None)
        cause = f"; first error: {one_line(first)}" if first else ""
        raise UserError(f"no trial finished ({len(errors)} errored{cause}); re-run the same command to resume")
    best = max(done, key=lambda r: r.S)
    out = storage.absolute(cfg.output_dir)
    best_model = storage.join(out, "best", "model")
    storage.copy_directory(best.model_dir, best_model, marker="config.json")
    best_spec = {"name": f"{tc.method.name}-best", "method": tc.method.method, "set": best.set}
    test = None
    if validation and test_sets:  # the best model, scored on data it was not picked on
        test_cfg = cfg.model_copy(deep=True)
        test_cfg.eval.sets = test_sets
        test = evaluate_models(test_cfg, {"best": best_model})["best"]
    summary = {
        "trials": [r.as_json() for r in rows],
        "best": {**best.as_json(), "spec": best_spec, "exported_to": best_model, "test": test},
        "errored": len(errors),
        "total_wall_s": time.monotonic() - start,
    }
    storage.write_bytes_atomic(storage.join(out, "best.yaml"), yaml.safe_dump({"methods": [best_spec]}).encode())
    _write_summary(out, summary, list(space))
    if errors:
        log.warning("%d trial(s) errored; re-run the same command to resume them", len(errors))
    return summary


def _asha(cfg: Config) -> tune.schedulers.ASHAScheduler:
    """ASHA over the trials' evaluations; checkpoints move to every evaluation, because
    Train reports at checkpoints too and ASHA needs S in every report."""
    tc = cfg.tune
    if cfg.train.checkpoint_every != cfg.train.eval_every:
        log.info("tune.asha: checkpointing at every evaluation (train.checkpoint_every = %d)", cfg.train.eval_every)
        cfg.train.checkpoint_every = cfg.train.eval_every
    return tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",
        metric="S",
        mode="max",
        grace_period=tc.grace_evals,
        reduction_factor=tc.reduction_factor,
        max_t=10**6,
        stop_last_trials=False,
    )


def _write_summary(out: str, summary: dict, knobs: list[str]) -> None:
    storage.write_bytes_atomic(storage.join(out, "tune.json"), json.dumps(summary, indent=1, default=str).encode())
    md = tune_markdown(summary, knobs)
    storage.write_bytes_atomic(storage.join(out, "tune.md"), md.encode())
    print(md)


# ---------------------------------------------------------------- merge knob sweeps

MERGE_KNOB = "merge.knob"


def _merge_trial(params: dict, *, cfg_dump: dict, model_dir: str, fisher_uris, val_data: EvalData) -> None:
    """One trial: the merge at one knob, scored on the validation sets (no training)."""
    cfg = Config.model_validate(cfg_dump)
    torch.set_num_threads(cfg.train.cpus_per_worker)
    knob = float(params["set"][MERGE_KNOB])
    model = merged_model(cfg, model_dir, cfg.merge.mode, knob, fisher_uris)
    start = time.monotonic()
    sets = {n: ray.get(r) for n, r in val_data.refs.items()}
    scored = score_sets(model, sets, val_data.kinds, cfg.eval.batch_size, "cpu")
    tune.report({**scored, "final": True, "run_wall_s": time.monotonic() - start, "model_dir": model_dir})


def run_merge_sweep(cfg: Config) -> dict:
    """`dba-ray tune` over merge.knob on a finished run: each trial is an evaluation of one
    merge on the validation sets; the best is exported and scored on eval.sets."""
    tc = cfg.tune
    validation = tc.validation_sets or cfg.eval.validation_sets
    if not validation:
        raise UserError("a merge.knob sweep chooses on validation sets: set eval.validation_sets")
    cfg = ensure_base_model(cfg, may_pretrain=False)
    cfg.merge = cfg.merge or MergeConfig()
    out = storage.absolute(cfg.output_dir)
    model_dir = next(iter(cfg.merge.models.values()), storage.join(out, tc.method.name, "model"))
    if len(cfg.merge.models) > 1 or not storage.exists(storage.join(model_dir, "config.json")):
        raise UserError(
            f"a merge.knob sweep needs one trained model: none at {model_dir} "
            f"(train it with dba-ray train --method {tc.method.name}, or give one in merge.models)"
        )
    knobs = flatten(tc.search, keep=_is_domain)[MERGE_KNOB]
    knobs = knobs if isinstance(knobs, list) else None
    if knobs is None:
        raise UserError(f"tune.search.{MERGE_KNOB}: give a list of knob values (a grid)")
    cfg.merge = MergeConfig(mode=cfg.merge.mode, knobs=knobs)  # checks the values for the mode
    ensure_ray(cfg.ray)
    start = time.monotonic()
    fisher_uris = (general_fisher_uri(cfg), domain_fisher(cfg, model_dir)[0]) if cfg.merge.mode == "fisher" else None
    val_data = tokenize_eval(cfg, validation)
    trainable = tune.with_resources(
        tune.with_parameters(
            _merge_trial, cfg_dump=cfg.model_dump(), model_dir=model_dir, fisher_uris=fisher_uris, val_data=val_data
        ),
        {"CPU": cfg.train.cpus_per_worker},
    )
    param_space = {"name": f"merge-{tc.method.name}", "set": {MERGE_KNOB: tune.grid_search(cfg.merge.knob_values())}}
    grid = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=tc.max_concurrent, reuse_actors=True),  # as trials.py
        run_config=sweep_run_config(
            "tune-merge",
            out,
            TrialProgress(
                cfg.train.progress_interval_s,
                [MERGE_KNOB],
                len(cfg.merge.knob_values()),
                storage.join(out, "tune-merge"),
            ),
        ),
    ).fit()
    rows = [TrialRow.of(r) for r in grid]
    done = [r for r in rows if r.status == "done"]
    if not done:
        raise UserError(f"no merge trial finished: {next((one_line(r.error) for r in grid if r.error), '?')}")
    done = [r for r in done if not math.isnan(r.S)] or done
    # As merge curves choose: the best validation S, ties to the end nearer the trained model.
    nearer = (lambda k: -k) if cfg.merge.mode == "fisher" else (lambda k: k)
    best = max(done, key=lambda r: (r.S, nearer(float(r.set[MERGE_KNOB]))))
    knob = float(best.set[MERGE_KNOB])
    test = None
    if cfg.eval.sets:
        groups = EvalGroups.of(tokenize_eval(cfg))
        test = curve_points([knob], submit_curve(cfg, model_dir, cfg.merge.mode, [knob], groups, fisher_uris))[0].test
    best_dir = storage.join(out, "best", "model")
    chosen_on = best.scores()
    export_merge(cfg, tc.method.name, model_dir, cfg.merge.mode, knob, fisher_uris, chosen_on, best_dir)
    summary = {
        "trials": [r.as_json() for r in rows],
        "best": {**best.as_json(), "exported_to": best_dir, "test": test, "mode": cfg.merge.mode},
        "errored": len(rows) - len(done),
        "total_wall_s": time.monotonic() - start,
    }
    _write_summary(out, summary, [MERGE_KNOB])
    return summary


def tune_markdown(summary: dict, knobs: list[str]) -> str:
    head = ["trial", *knobs, "S_D", "S_G", "S", "time s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(sorted(summary["trials"], key=lambda r: -r["S"] if not math.isnan(r["S"]) else 1)):
        cells = [str(i + 1), *[f"{r['set'].get(k)}" for k in knobs]]
        cells += [f"{r[k]:.4f}" for k in ("S_D", "S_G", "S")] + [f"{r['time_s']:.0f}", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    b = summary["best"]
    knob_text = ", ".join(f"{k}={b['set'].get(k)}" for k in knobs)
    lines.append(f"\nBest (S {b['S']:.4f} on the validation sets): {knob_text}; model exported to {b['exported_to']}")
    if b.get("test"):
        t = b["test"]
        lines.append(f"On eval.sets: S_D {t['S_D']:.4f}, S_G {t['S_G']:.4f}, S {t['S']:.4f}")
    return "\n".join(lines) + "\n"
