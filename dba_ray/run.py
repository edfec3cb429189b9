"""`dba-ray run`: base model → Stage 1 (or a matching artifact) → Stage 2 per method →
evaluation of the base and of every result → report.json / report.md; and `dba-ray
merge`, the merge curves of finished runs."""

from __future__ import annotations

import json
import time

from dba_ray import model_card, preflight, storage, tracking
from dba_ray.config import Config, MergeConfig
from dba_ray.data.arrays import tokenize_eval
from dba_ray.errors import UserError
from dba_ray.merge_curves import EvalGroups, curves_json, merge_curves
from dba_ray.methods import config_for_run, needs_stage1
from dba_ray.plots import frontier
from dba_ray.prepare import ensure_base_model, mixture_trains, prepare
from dba_ray.ray_runtime import ensure_ray
from dba_ray.report import RunRow, build_report, merges_markdown, run_facts, write_report
from dba_ray.scoring import evaluate_models, score_after_training, score_validation
from dba_ray.trainer import run_train


@tracking.tracked_command("run")
def run_all(cfg: Config) -> dict:
    """The whole pipeline; returns the report (also written to output_dir)."""
    if not cfg.eval.sets:
        raise UserError("dba-ray run needs eval.sets (domain and general) to score the methods")
    preflight.check(cfg, cfg.methods, merge=True)
    ensure_ray(cfg.ray)
    start = time.monotonic()
    prepared = prepare(cfg, mixtures=mixture_trains(cfg, cfg.methods), stage1=needs_stage1(cfg, cfg.methods))
    cfg = prepared.cfg
    base = evaluate_models(cfg, {"base": cfg.model.name_or_path}, prepared.eval)["base"]
    results = {}
    for spec in cfg.methods:
        r = run_train(cfg, spec, **prepared.run_train_data())
        results[spec.name] = RunRow(
            scores=r.metrics,
            wall_s=r.wall_s,
            tokens=r.tokens,
            steps=r.steps,
            resumed_at=r.resumed_at,
            model_dir=r.model_dir,
            method=spec.name,
            lr=config_for_run(cfg, spec).train.schedule.lr,
        )
    merges = score_after_training(cfg, base, results, prepared)
    report = build_report(
        base,
        results,
        run_facts(cfg, prepared, time.monotonic() - start, merges),
    )
    out = storage.absolute(cfg.output_dir)
    md = write_report(out, report)
    model_card.write_cards(report)
    if merges:
        frontier(report, storage.join(out, "frontier.png"))
    print(md)
    return report


def run_merge(cfg: Config) -> dict:
    """`dba-ray merge`: merge curves of finished runs (merge.models, or each method's
    model under output_dir), scored and chosen like those of `run`; merge.json / merge.md."""
    if not cfg.eval.sets:
        raise UserError("dba-ray merge needs eval.sets (domain and general) to score the merges")
    preflight.eval_kinds(cfg)
    cfg = cfg.model_copy(update={"merge": cfg.merge or MergeConfig()})
    cfg = ensure_base_model(cfg, may_pretrain=False)
    ensure_ray(cfg.ray)
    out = storage.absolute(cfg.output_dir)
    models = dict(cfg.merge.models) or {
        m.name: storage.join(out, m.name, "model")
        for m in cfg.methods
        if storage.exists(storage.join(out, m.name, "model", "config.json"))
    }
    if not models:
        raise UserError(
            f"nothing to merge: merge.models is empty and no method in `methods` has a model under {out} "
            "(train first with dba-ray run or dba-ray train)"
        )
    eval_data = tokenize_eval(cfg)
    val_data = tokenize_eval(cfg, cfg.eval.validation_sets) if cfg.eval.validation_sets else None
    base = evaluate_models(cfg, {"base": cfg.model.name_or_path}, eval_data)["base"]
    if val_data is not None:
        base["validation"] = score_validation(cfg, {"base": cfg.model.name_or_path}, val_data)["base"]
    # A model named in merge.models gets its F_D and export under output_dir/merge/<name>,
    # so models that share a parent folder keep theirs apart.
    homes = {name: storage.join(out, "merge", name) for name in cfg.merge.models}
    merges = curves_json(merge_curves(cfg, models, EvalGroups.of(eval_data, val_data), homes))
    report = {"base": base, "merges": merges}
    storage.write_bytes_atomic(storage.join(out, "merge.json"), json.dumps(report, indent=1).encode())
    md = merges_markdown(merges)
    storage.write_bytes_atomic(storage.join(out, "merge.md"), md.encode())
    print(md)
    return report
