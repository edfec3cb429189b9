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
from dba_ray.errors import UserError
from dba_ray.methods import config_for_run, uses_global_gradient
from dba_ray.plots import frontier, training_curves
from dba_ray.ray_runtime import ensure_ray
from dba_ray.report import build_report, write_report
from dba_ray.run import check_merge, ensure_base_model, ensure_global_gradient, evaluate_models, score_after_training
from dba_ray.trainer import (
    mixture_domain_rows, mixture_general_count, planned_steps, prepare_eval, prepare_mixture_data,
    prepare_train_data, saturation_warning,
)
from dba_ray.trials import run_trials, trial_row

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
                runs.append({"name": name, "method": spec.method, "group": spec.name,
                             "set": {"schedule.lr": lr, "seed": seed, **spec.set}})
    return runs


def _cost(rows: dict[str, dict], stage1: dict | None) -> None:
    """Adds ``cost`` to each row (see the module docstring for what is charged)."""
    for r in rows.values():
        r["cost"] = {"own_tokens": r["tokens"], "own_wall_s": r["wall_s"], "worker_s": r["wall_s"] * r["num_workers"]}
        extra_tokens, extra_wall = 0, 0.0
        if r["uses_global_gradient"] and stage1:
            extra_tokens += stage1["tokens"]
            extra_wall += stage1["wall_s"]
        if r["family"] == "mixture":
            search = [s for s in rows.values() if s["family"] == "mixture" and s is not r
                      and (s["lr"], s["seed"]) == (r["lr"], r["seed"])]
            extra_tokens += sum(s["tokens"] for s in search)
            extra_wall += sum(s["wall_s"] for s in search)
            r["cost"]["ratio_search_runs"] = len(search) + 1
        r["cost"]["total_tokens"] = r["tokens"] + extra_tokens
        r["cost"]["total_wall_s"] = r["wall_s"] + extra_wall


@tracking.tracked_command("compare")
def run_compare(cfg: Config) -> dict:
    if not cfg.eval.sets:
        raise UserError("dba-ray compare needs eval.sets (domain and general) to score the methods")
    runs = expand_runs(cfg)
    preflight.check(cfg, [MethodSpec(name=r["name"], method=r["method"], set=r["set"]) for r in runs])
    check_merge(cfg)
    ensure_ray(cfg.ray)
    start = time.monotonic()
    # Data first: a data problem (a mixture without general data too) is refused before
    # pretraining and Stage 1 (the configured tokenizer is the pretrained base's too).
    refs = {"train": prepare_train_data(cfg)}
    resolved = {r["name"]: config_for_run(cfg, MethodSpec(name=r["name"], method=r["method"], set=r["set"])) for r in runs}
    n_domain = len(ray.get(refs["train"])["input_ids"])
    warnings = {saturation_warning(r["group"], t.dba, planned_steps(t, n_domain))
                for r in runs for t in [resolved[r["name"]].train]}
    for line in sorted(warnings - {None}):  # once per method, not per lr and seed
        log.warning(line)
    mixtures = [resolved[r["name"]].train for r in runs if r["method"] == "mixture"]
    general_have = 0
    if mixtures:
        refs["general"] = prepare_mixture_data(cfg, refs["train"], mixtures)
        general_have = len(ray.get(refs["general"])["input_ids"])
    cfg = ensure_base_model(cfg)
    needs_grad = {n for n, c in resolved.items() if uses_global_gradient(c.train.dba)}
    merge_fisher = cfg.merge is not None and cfg.merge.mode == "fisher"
    stage1 = ensure_global_gradient(cfg) if needs_grad or merge_fisher else None
    refs.update(grad_source=stage1["uri"] if stage1 else None, eval=prepare_eval(cfg))
    base = evaluate_models(cfg, {"base": cfg.model.name_or_path}, refs["eval"])["base"]
    log.info("compare: %d runs (%d at a time)", len(runs), cfg.compare.max_concurrent)
    trial_runs = [{k: r[k] for k in ("name", "method", "set")} for r in runs]
    grid = run_trials(cfg, {"run": ray.tune.grid_search(trial_runs)}, refs, name="compare",
                      max_concurrent=cfg.compare.max_concurrent)
    by_name = {r["name"]: r for r in runs}
    rows, failed = {}, []
    for result in grid:
        row = trial_row(result)
        if row["status"] != "done":
            failed.append(f"{row['name']} ({result.error or row['status']})")
            continue
        spec = by_name[row["name"]]
        t = resolved[row["name"]].train
        rows[row["name"]] = {
            **{k: row[k] for k in ("S_D", "S_G", "S", "eval", "tokens", "steps", "wall_s", "peak_mem_mb", "model_dir")},
            "method": spec["group"], "family": spec["method"], "lr": t.schedule.lr, "seed": t.seed,
            "set": spec["set"], "uses_global_gradient": row["name"] in needs_grad, "num_workers": t.num_workers,
        }
        if spec["method"] == "mixture":
            need = mixture_general_count(len(mixture_domain_rows(t, n_domain)), t.mixture.ratio)
            # More than the general data holds: sequences were cycled (each used ≤ this often).
            rows[row["name"]].update(ratio=t.mixture.ratio, general_sequences=need,
                                     general_reuse=-(-need // general_have))
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; re-run the same command to resume them")
    _cost(rows, stage1)
    ordered = {r["name"]: rows[r["name"]] for r in runs}
    merges = score_after_training(cfg, base, ordered, refs["eval"])
    report = build_report(base, ordered, {
        "base_model": cfg.model.name_or_path, "stage1": stage1,
        "total_wall_s": time.monotonic() - start, "cost_unit": "trained tokens (forward + backward)",
        "merges": merges,
    })
    out = storage.absolute(cfg.output_dir)
    md = write_report(out, report)
    model_card.write_cards(report)
    frontier(report, storage.join(out, "frontier.png"))
    dba_runs = {n: read_curves(os.path.dirname(r["model_dir"])) for n, r in ordered.items() if r["family"] == "dba"}
    if dba_runs:
        training_curves(dba_runs, storage.join(out, "dba_curves.png"))
    print(md)
    return report
