"""`dba-ray run`: base model → Stage 1 (or a matching artifact) → Stage 2 per method →
evaluation of the base and of every result → report.json / report.md."""

from __future__ import annotations

import json
import logging
import time

import ray
import torch

from dba_ray import artifact, harness, model_card, preflight, storage, tracking
from dba_ray.config import Config, MergeConfig
from dba_ray.errors import UserError
from dba_ray.evaluate import score_sets
from dba_ray.global_gradient import run_global_gradient
from dba_ray.merge_curves import EvalGroups, curves_json, general_fisher_uri, merge_curves
from dba_ray.methods import config_for_run, uses_global_gradient
from dba_ray.model import load_model
from dba_ray.plots import frontier
from dba_ray.ray_runtime import ensure_ray
from dba_ray.report import build_report, merges_markdown, write_report
from dba_ray.reuse import pretrain_plan, planned_base, refuse_replacing, stage1_mismatch, stage1_wall_s
from dba_ray.trainer import prepare_eval, prepare_mixture_data, prepare_train_data, run_train

log = logging.getLogger("dba_ray")


def ensure_base_model(cfg: Config, may_pretrain: bool = True) -> Config:
    """With a ``pretrain`` section, train the base model once (reused while every
    setting pretraining depends on is unchanged) and point ``model`` at it. Commands
    that only read finished runs (merge) pass ``may_pretrain=False``: a missing base
    means those runs came from another config."""
    if cfg.pretrain is None:
        return cfg
    p = cfg.pretrain
    pre, base_dir, model_dir = pretrain_plan(cfg)
    if not storage.exists(storage.join(model_dir, "config.json")):
        if not may_pretrain:
            raise UserError(
                f"the pretrained base model of this config is not in {base_dir}: merging needs the base the "
                "runs started from; run dba-ray run (or compare) with this config first"
            )
        log.info("pretraining the base model (%d steps); cached under %s", p.max_steps, base_dir)
        pre.output_dir = base_dir
        run_train(pre, "pretrain")
    else:
        log.info("reusing the pretrained base model in %s", base_dir)
    return planned_base(cfg)


def ensure_global_gradient(cfg: Config) -> dict:
    """Reuse the artifact if it was made for this model and these data; else run Stage 1.
    An artifact made differently is replaced only with ``stage1.overwrite``: it may be
    another config's, and hours of compute at real scale."""
    uri = storage.absolute(cfg.global_gradient_source())
    if cfg.train.global_gradient is not None:
        meta = artifact.read_meta(uri)
        return {"uri": uri, "reused": True, "wall_s": stage1_wall_s(meta), "tokens": meta["tokens"]}
    if storage.exists(storage.join(uri, "meta.json")):
        meta = artifact.read_meta(uri)
        differs = stage1_mismatch(cfg, meta)
        if differs is None:
            log.info("reusing the global gradient at %s", uri)
            return {"uri": uri, "reused": True, "wall_s": stage1_wall_s(meta), "tokens": meta["tokens"]}
        if not cfg.stage1.overwrite:
            raise refuse_replacing(uri, differs)
        log.info("the global gradient at %s was made with another %s: replacing it (stage1.overwrite)", uri, differs)
    s1 = cfg.model_copy(deep=True)
    # Nothing complete is there (never loaded: an interrupted write), or replacing it
    # was allowed above.
    s1.stage1.overwrite = True
    start = time.monotonic()
    result = run_global_gradient(s1)
    return {"uri": uri, "reused": False, "wall_s": time.monotonic() - start, "tokens": result.meta["tokens"]}


@ray.remote
def _evaluate_remote(cfg_dump: dict, model_path: str, eval_refs: dict, kinds: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_dump)
    cfg.model.name_or_path = model_path
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model).to(device)
    return score_sets(model, {name: ray.get(ref) for name, ref in eval_refs.items()}, kinds, cfg.eval.batch_size, device)


def evaluate_models(cfg: Config, models: dict[str, str], eval_refs=None) -> dict[str, dict]:
    """Score each model (name: path) on every eval set, as Ray tasks (lm_eval sets in
    tasks of their own, see dba_ray/harness.py)."""
    harness.require_harness(cfg)
    ensure_ray(cfg.ray)
    refs, kinds = eval_refs or prepare_eval(cfg)
    if not refs and not harness.harness_sets(cfg):
        raise UserError("no eval sets: add eval.sets to the config")
    t = cfg.train
    task = _evaluate_remote.options(num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0)
    futures = {
        name: task.remote(cfg.model_dump(), path, refs, kinds, t.cpus_per_worker)
        for name, path in models.items()
    } if refs else {}
    benchmarks = harness.submit(cfg, models)
    return {
        name: harness.combine(
            cfg, ray.get(futures[name])["eval"] if refs else {}, harness.fetch(benchmarks[name]) if benchmarks else {}
        )
        for name in models
    }


def check_merge(cfg: Config) -> None:
    """What a merge section needs, refused before any training."""
    mc = cfg.merge
    if mc is None:
        return
    unknown = sorted(set(mc.methods) - {m.name for m in cfg.methods})
    if unknown:
        raise UserError(f"merge.methods names {unknown}, which are not in methods ({[m.name for m in cfg.methods]})")
    if mc.mode == "fisher" and cfg.train.global_gradient is None and not cfg.stage1.second_moment:
        raise UserError("merge.mode fisher weighs by v_G: set stage1.second_moment: true")
    if mc.mode == "fisher" and cfg.train.global_gradient is not None:
        general_fisher_uri(cfg)  # a given artifact: v_G present, made for this model


def needs_stage1(cfg: Config, specs) -> bool:
    """ĝ_G is needed by a method that uses it, and v_G by a fisher merge."""
    merge_fisher = cfg.merge is not None and cfg.merge.mode == "fisher"
    return merge_fisher or any(uses_global_gradient(config_for_run(cfg, spec).train.dba) for spec in specs)


def validation_config(cfg: Config) -> Config | None:
    """``cfg`` with the validation sets as its eval sets (None without any): scored and
    combined exactly like the eval sets, but never reported as them."""
    if not cfg.eval.validation_sets:
        return None
    out = cfg.model_copy(deep=True)
    out.eval.sets = cfg.eval.validation_sets
    return out


def score_after_training(cfg: Config, base: dict, results: dict[str, dict], eval_refs) -> dict:
    """Scores of the base and every run on eval.validation_sets (``validation``) and,
    with a merge section, each run's merge curve; returns the curves for report.json."""
    val_cfg = validation_config(cfg)
    val_refs = prepare_eval(val_cfg) if val_cfg else None
    if val_refs is not None:
        models = {"base": cfg.model.name_or_path, **{n: r["model_dir"] for n, r in results.items()}}
        scored = evaluate_models(val_cfg, models, val_refs)
        base["validation"] = scored.pop("base")
        for name, s in scored.items():
            results[name]["validation"] = s
    if cfg.merge is None:
        return {}
    wanted = cfg.merge.methods
    models = {n: r["model_dir"] for n, r in results.items() if not wanted or r.get("method", n) in wanted}
    return curves_json(merge_curves(cfg, models, EvalGroups.of(eval_refs, val_refs)))


@tracking.tracked_command("run")
def run_all(cfg: Config) -> dict:
    """The whole pipeline; returns the report (also written to output_dir)."""
    if not cfg.eval.sets:
        raise UserError("dba-ray run needs eval.sets (domain and general) to score the methods")
    preflight.check(cfg, cfg.methods)
    check_merge(cfg)
    ensure_ray(cfg.ray)
    start = time.monotonic()
    # Tokenized before pretraining and Stage 1 (with the configured tokenizer, which a
    # pretrained base keeps), so that a mixture without general data is refused
    # before hours of work.
    train_ref = prepare_train_data(cfg)
    mixtures = [config_for_run(cfg, s).train for s in cfg.methods if s.method == "mixture"]
    general_ref = prepare_mixture_data(cfg, train_ref, mixtures) if mixtures else None
    cfg = ensure_base_model(cfg)
    stage1 = ensure_global_gradient(cfg) if needs_stage1(cfg, cfg.methods) else None
    eval_refs = prepare_eval(cfg)
    base = evaluate_models(cfg, {"base": cfg.model.name_or_path}, eval_refs)["base"]
    results = {}
    for spec in cfg.methods:
        r = run_train(cfg, spec, eval_refs=eval_refs, train_ref=train_ref, general_ref=general_ref)
        results[spec.name] = {
            **r.metrics, "wall_s": r.wall_s, "tokens": r.tokens, "steps": r.steps, "resumed_at": r.resumed_at,
            "model_dir": r.model_dir, "method": spec.name, "lr": config_for_run(cfg, spec).train.schedule.lr,
        }
    merges = score_after_training(cfg, base, results, eval_refs)
    report = build_report(
        base,
        results,
        {
            "base_model": cfg.model.name_or_path,
            "stage1": stage1,
            "total_wall_s": time.monotonic() - start,
            "merges": merges,
        },
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
    eval_refs = prepare_eval(cfg)
    val_cfg = validation_config(cfg)
    val_refs = prepare_eval(val_cfg) if val_cfg else None
    base = evaluate_models(cfg, {"base": cfg.model.name_or_path}, eval_refs)["base"]
    if val_refs is not None:
        base["validation"] = evaluate_models(val_cfg, {"base": cfg.model.name_or_path}, val_refs)["base"]
    # A model named in merge.models gets its F_D and export under output_dir/merge/<name>,
    # so models that share a parent folder keep theirs apart.
    homes = {name: storage.join(out, "merge", name) for name in cfg.merge.models}
    merges = curves_json(merge_curves(cfg, models, EvalGroups.of(eval_refs, val_refs), homes))
    report = {"base": base, "merges": merges}
    storage.write_bytes_atomic(storage.join(out, "merge.json"), json.dumps(report, indent=1).encode())
    md = merges_markdown(merges)
    storage.write_bytes_atomic(storage.join(out, "merge.md"), md.encode())
    print(md)
    return report
