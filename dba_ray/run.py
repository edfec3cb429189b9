"""`dba-ray run`: base model → Stage 1 (or a matching artifact) → Stage 2 per method →
evaluation of the base and of every result → report.json / report.md."""

from __future__ import annotations

import json
import logging
import time

import ray

from dba_ray import artifact, harness, model_card, storage, tracking
from dba_ray.config import Config, digest
from dba_ray.data import describe_source
from dba_ray.errors import UserError
from dba_ray.evaluate import scores, set_metrics, set_sums
from dba_ray.global_gradient import run_global_gradient, stage1_settings
from dba_ray.methods import resolve, uses_global_gradient
from dba_ray.model import load_empty_model, load_model, model_source
from dba_ray.ray_runtime import ensure_ray
from dba_ray.report import build_report, write_report
from dba_ray.trainer import prepare_eval, prepare_train_data, run_train

log = logging.getLogger("dba_ray")


def ensure_base_model(cfg: Config) -> Config:
    """With a ``pretrain`` section, train the base model once (reused while every
    setting pretraining depends on is unchanged) and point ``model`` at it."""
    if cfg.pretrain is None:
        return cfg
    p = cfg.pretrain
    pre = cfg.model_copy(deep=True)
    pre.train.data, pre.train.max_records = p.data, None
    pre.train.max_steps, pre.train.batch_size, pre.train.grad_accum = p.max_steps, p.batch_size, 1
    pre.train.eval_every, pre.train.checkpoint_every = p.eval_every, 0
    pre.eval.sets = [s for s in cfg.eval.sets if s.kind == "general"]
    # Only what shapes the pretrained weights: a new fine-tuning setting keeps the cache.
    t = pre.train
    key = digest(
        [pre.model_dump(include={"model", "pretrain"}), t.optimizer.model_dump(), t.num_workers, t.seed, t.use_gpu]
    )
    base_dir = storage.join(storage.absolute(cfg.output_dir), "pretrain", key)
    model_dir = storage.join(base_dir, "pretrain", "model")  # run_train's layout
    if not storage.exists(storage.join(model_dir, "config.json")):
        log.info("pretraining the base model (%d steps); cached under %s", p.max_steps, base_dir)
        pre.output_dir = base_dir
        run_train(pre, "pretrain")
    else:
        log.info("reusing the pretrained base model in %s", base_dir)
    out = cfg.model_copy(deep=True)
    out.model.name_or_path = model_dir
    out.model.tokenizer = out.model.tokenizer or model_dir
    out.pretrain = None
    return out


def ensure_global_gradient(cfg: Config) -> dict:
    """Reuse the artifact if it was made for this model and these data; else run Stage 1."""
    uri = storage.absolute(cfg.global_gradient_source())
    if cfg.train.global_gradient is not None:
        return {"uri": uri, "reused": True, "wall_s": 0.0, "tokens": artifact.read_meta(uri)["tokens"]}
    if storage.exists(storage.join(uri, "meta.json")):
        meta = artifact.read_meta(uri)
        shapes = artifact.parameter_shapes(load_empty_model(cfg.model))
        same = (
            meta["param_fingerprint"] == artifact.fingerprint_of(shapes)
            and meta["base_model"] == json.loads(json.dumps(model_source(cfg.model)))
            and meta["dtype"] == cfg.model.dtype
            and cfg.stage1.data is not None
            and meta["data"]["description"] == json.loads(json.dumps(describe_source(cfg.stage1.data)))
            and meta.get("stage1_settings") == stage1_settings(cfg.stage1)
        )
        if same:
            log.info("reusing the global gradient at %s", uri)
            return {"uri": uri, "reused": True, "wall_s": 0.0, "tokens": meta["tokens"]}
        log.info("the global gradient at %s was made for other settings: recomputing", uri)
    s1 = cfg.model_copy(deep=True)
    s1.stage1.overwrite = True
    start = time.monotonic()
    result = run_global_gradient(s1)
    return {"uri": uri, "reused": False, "wall_s": time.monotonic() - start, "tokens": result.meta["tokens"]}


@ray.remote
def _evaluate_remote(cfg_dump: dict, model_path: str, eval_refs: dict, kinds: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_dump)
    cfg.model.name_or_path = model_path
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model).to(device)
    metrics = {}
    for name, ref in eval_refs.items():
        metrics[name] = set_metrics(set_sums(model, ray.get(ref), cfg.eval.batch_size, device).cpu())
    return {"eval": metrics, **scores(metrics, kinds)}


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


@tracking.tracked_command("run")
def run_all(cfg: Config) -> dict:
    """The whole pipeline; returns the report (also written to output_dir)."""
    if not cfg.eval.sets:
        raise UserError("dba-ray run needs eval.sets (domain and general) to score the methods")
    ensure_ray(cfg.ray)
    start = time.monotonic()
    cfg = ensure_base_model(cfg)
    needs_grad = any(uses_global_gradient(resolve(cfg, spec).train.dba) for spec in cfg.methods)
    stage1 = ensure_global_gradient(cfg) if needs_grad else None
    eval_refs = prepare_eval(cfg)
    base = evaluate_models(cfg, {"base": cfg.model.name_or_path}, eval_refs)["base"]
    results, train_ref = {}, prepare_train_data(cfg)
    for spec in cfg.methods:
        r = run_train(cfg, spec, eval_refs=eval_refs, train_ref=train_ref)
        results[spec.name] = {**r.metrics, "wall_s": r.wall_s, "tokens": r.tokens, "steps": r.steps, "model_dir": r.model_dir}
    report = build_report(
        base,
        results,
        {
            "base_model": cfg.model.name_or_path,
            "stage1": stage1,
            "total_wall_s": time.monotonic() - start,
        },
    )
    md = write_report(storage.absolute(cfg.output_dir), report)
    model_card.write_cards(report)
    print(md)
    return report
