"""`dba-ray compare`: every listed method (× learning rates × seeds) and the mixture
ratio search, on one base model and one ĝ_G, run as Ray Tune trials; then
report.json / report.md with each run's scores, raw metrics, deltas, wall time, tokens,
peak memory and total cost, plus two PNGs (the S_G–S_D frontier, DBA's training curves).

Cost is counted in trained tokens (one forward and backward pass each), which does not
depend on the machine or on how many runs shared it; wall and worker seconds are
reported beside it. A run that uses ĝ_G is charged the whole Stage 1 job (a base model's
ĝ_G is reused across domains, so this overstates DBA's cost per domain); a mixture run
is charged every mixture run of its ratio search at the same learning rate and seed.
"""

from __future__ import annotations

import logging
import os
import time

import ray

from dba_ray import model_card, preflight, storage, tracking
from dba_ray.config import Config, MethodSpec
from dba_ray.curves import read_curves
from dba_ray.data.order import mixture_domain_rows, mixture_general_count, planned_steps
from dba_ray.errors import UserError, one_line
from dba_ray.methods import config_for_run, uses_global_gradient
from dba_ray.plots import frontier, training_curves
from dba_ray.prepare import Prepared, Stage1Summary, prepare
from dba_ray.ray_runtime import ensure_ray
from dba_ray.report import CompareRow, Cost, MixtureFacts, build_report, run_facts, write_report
from dba_ray.scoring import evaluate_models, score_after_training
from dba_ray.trainer import saturation_warning
from dba_ray.trials import TrialRow, run_trials

log = logging.getLogger("dba_ray")


def expand_runs(cfg: Config) -> list[dict]:
    """Every (method, lr, seed) of the comparison as ``{name, method, set, group}``. A
    method that sets its own schedule.lr keeps it."""
    c = cfg.compare
    lrs = c.lrs or [cfg.train.schedule.lr]
    specs = list(cfg.methods) + [
        MethodSpec(name=f"mixture-r{r:g}", method="mixture", set={"mixture.ratio": r}) for r in c.mixture_ratios
    ]
    runs, seen = [], set()
    for spec in specs:
        own_lr = "schedule.lr" in spec.set
        for lr in [spec.set["schedule.lr"]] if own_lr else lrs:
            for seed in c.seeds:
                name = spec.name
                if len(lrs) > 1 and not own_lr:
                    name += f"_lr{lr:g}"
                if len(c.seeds) > 1:
                    name += f"_s{seed}"
                if name in seen:
                    raise UserError(f"two runs of the comparison are named {name!r}: rename one method")
                seen.add(name)
                runs.append(
                    {
                        "name": name,
                        "method": spec.method,
                        "group": spec.name,
                        "set": {"schedule.lr": lr, "seed": seed, **spec.set},
                    }
                )
    return runs


def _cost(rows: dict[str, CompareRow], stage1: Stage1Summary | None) -> None:
    """Sets each row's ``cost`` (see the module docstring for what is charged)."""
    for r in rows.values():
        cost = Cost(own_tokens=r.tokens, own_wall_s=r.wall_s, worker_s=r.wall_s * r.num_workers)
        extra_tokens, extra_wall = 0, 0.0
        if r.uses_global_gradient and stage1:
            extra_tokens += stage1.tokens
            extra_wall += stage1.wall_s
        if r.family == "mixture":
            search = [
                s for s in rows.values() if s.family == "mixture" and s is not r and (s.lr, s.seed) == (r.lr, r.seed)
            ]
            extra_tokens += sum(s.tokens for s in search)
            extra_wall += sum(s.wall_s for s in search)
            cost.ratio_search_runs = len(search) + 1
        cost.total_tokens = r.tokens + extra_tokens
        cost.total_wall_s = r.wall_s + extra_wall
        r.cost = cost


def _warn_saturation(runs: list[dict], resolved: dict[str, Config], n_domain: int) -> None:
    """GGB's saturation warning, once per method (not per lr and seed)."""
    warnings = {
        saturation_warning(r["group"], t.dba, planned_steps(t, n_domain))
        for r in runs
        for t in [resolved[r["name"]].train]
    }
    for line in sorted(warnings - {None}):
        log.warning(line)


def _row(trial: TrialRow, run: dict, cfg: Config, uses_grad: bool, n_domain: int, general_have: int) -> CompareRow:
    """A finished trial as report.json's row (``n_domain``: domain sequences;
    ``general_have``: general sequences at hand for the mixture runs)."""
    t = cfg.train
    row = CompareRow(
        scores={"S_D": trial.S_D, "S_G": trial.S_G, "S": trial.S, "eval": trial.eval},
        tokens=trial.tokens,
        steps=trial.steps,
        resumed_at=trial.resumed_at,
        wall_s=trial.wall_s,
        peak_mem_mb=trial.peak_mem_mb,
        model_dir=trial.model_dir,
        method=run["group"],
        family=run["method"],
        lr=t.schedule.lr,
        seed=t.seed,
        set=run["set"],
        uses_global_gradient=uses_grad,
        num_workers=t.num_workers,
    )
    if run["method"] == "mixture":
        need = mixture_general_count(len(mixture_domain_rows(t, n_domain)), t.mixture.ratio)
        # More than the general data holds: sequences were cycled (each used ≤ this often).
        row.mixture = MixtureFacts(
            ratio=t.mixture.ratio, general_sequences=need, general_reuse=-(-need // general_have)
        )
    return row


def _rows(grid, runs: list[dict], resolved: dict[str, Config], needs_grad: set[str], prepared: Prepared) -> dict:
    """Report rows of the finished trials, in the order of ``runs``; refuses failed ones."""
    n_domain = len(ray.get(prepared.train)["input_ids"])
    general_have = len(ray.get(prepared.general)["input_ids"]) if prepared.general is not None else 0
    by_name = {r["name"]: r for r in runs}
    rows, failed = {}, []
    for result in grid:
        trial = TrialRow.of(result)
        if trial.status != "done":
            failed.append(f"{trial.name} ({one_line(result.error) if result.error else trial.status})")
            continue
        rows[trial.name] = _row(
            trial, by_name[trial.name], resolved[trial.name], trial.name in needs_grad, n_domain, general_have
        )
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; re-run the same command to resume them")
    return {r["name"]: rows[r["name"]] for r in runs}


@tracking.tracked_command("compare")
def run_compare(cfg: Config) -> dict:
    if not cfg.eval.sets:
        raise UserError("dba-ray compare needs eval.sets (domain and general) to score the methods")
    runs = expand_runs(cfg)
    specs = [MethodSpec(name=r["name"], method=r["method"], set=r["set"]) for r in runs]
    at_once = ("compare.max_concurrent", min(cfg.compare.max_concurrent, len(specs)))
    preflight.check(cfg, specs, concurrent=at_once, merge=True)
    ensure_ray(cfg.ray)
    start = time.monotonic()
    resolved = {s.name: config_for_run(cfg, s) for s in specs}
    needs_grad = {n for n, c in resolved.items() if uses_global_gradient(c.train.dba)}
    merge_fisher = cfg.merge is not None and cfg.merge.mode == "fisher"
    mixtures = [resolved[s.name].train for s in specs if s.method == "mixture"]
    prepared = prepare(cfg, mixtures=mixtures, stage1=bool(needs_grad) or merge_fisher)
    _warn_saturation(runs, resolved, len(ray.get(prepared.train)["input_ids"]))
    cfg = prepared.cfg
    base = evaluate_models(cfg, {"base": cfg.model.name_or_path}, prepared.eval)["base"]
    log.info("compare: %d runs (%d at a time)", len(runs), cfg.compare.max_concurrent)
    trial_runs = [{k: r[k] for k in ("name", "method", "set")} for r in runs]
    grid = run_trials(
        cfg,
        {"run": ray.tune.grid_search(trial_runs)},
        prepared,
        name="compare",
        max_concurrent=cfg.compare.max_concurrent,
        knobs=[],  # run names are unique
        total=len(trial_runs),
    )
    ordered = _rows(grid, runs, resolved, needs_grad, prepared)
    _cost(ordered, prepared.stage1)
    merges = score_after_training(cfg, base, ordered, prepared)
    report = build_report(
        base,
        ordered,
        run_facts(cfg, prepared, time.monotonic() - start, merges, "trained tokens (forward + backward)"),
    )
    out = storage.absolute(cfg.output_dir)
    md = write_report(out, report)
    model_card.write_cards(report)
    frontier(report, storage.join(out, "frontier.png"))
    dba_runs = {n: read_curves(os.path.dirname(r.model_dir)) for n, r in ordered.items() if r.family == "dba"}
    if dba_runs:
        training_curves(dba_runs, storage.join(out, "dba_curves.png"))
    print(md)
    return report
