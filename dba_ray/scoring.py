"""Scoring saved models, for the commands: each model on every eval set as a Ray task
(lm_eval sets in tasks of their own, see dba_ray/harness.py), the validation sets
scored the same way but kept apart, and the merge curves after training."""

from __future__ import annotations

import logging

import ray
import torch

from dba_ray import harness
from dba_ray.config import Config
from dba_ray.data.arrays import EvalData, tokenize_eval
from dba_ray.errors import UserError
from dba_ray.evaluate import score_sets
from dba_ray.merge_curves import EvalGroups, MergePoint, curves_json, merge_curves
from dba_ray.model import load_model
from dba_ray.prepare import Prepared
from dba_ray.ray_runtime import ensure_ray
from dba_ray.report import CompareRow, RunRow

log = logging.getLogger("dba_ray")


@ray.remote
def _evaluate_remote(cfg_dump: dict, model_path: str, eval_refs: dict, kinds: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_dump)
    cfg.model.name_or_path = model_path
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model).to(device)
    return score_sets(
        model, {name: ray.get(ref) for name, ref in eval_refs.items()}, kinds, cfg.eval.batch_size, device
    )


def evaluate_models(cfg: Config, models: dict[str, str], eval_data: EvalData | None = None) -> dict[str, dict]:
    """Score each model (name: path) on every eval set of ``cfg`` (``eval_data``: those
    sets, already tokenized)."""
    harness.require_harness(cfg)
    ensure_ray(cfg.ray)
    refs, kinds = eval_data or tokenize_eval(cfg)
    if not refs and not harness.harness_sets(cfg):
        raise UserError("no eval sets: add eval.sets to the config")
    t = cfg.train
    task = _evaluate_remote.options(num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0)
    futures = (
        {name: task.remote(cfg.model_dump(), path, refs, kinds, t.cpus_per_worker) for name, path in models.items()}
        if refs
        else {}
    )
    benchmarks = harness.submit(cfg, models)
    return {
        name: harness.combine(
            cfg, ray.get(futures[name])["eval"] if refs else {}, harness.fetch(benchmarks[name]) if benchmarks else {}
        )
        for name in models
    }


def validation_config(cfg: Config) -> Config | None:
    """``cfg`` with the validation sets as its eval sets (None without any): scored and
    combined exactly like the eval sets, but never reported as them."""
    if not cfg.eval.validation_sets:
        return None
    out = cfg.model_copy(deep=True)
    out.eval.sets = cfg.eval.validation_sets
    return out


def score_validation(cfg: Config, models: dict[str, str], validation: EvalData | None) -> dict[str, dict]:
    """Each model's scores on eval.validation_sets ({} without any)."""
    val_cfg = validation_config(cfg)
    if val_cfg is None:
        return {}
    return evaluate_models(val_cfg, models, validation or tokenize_eval(val_cfg))


def score_after_training(cfg: Config, base: dict, results: dict[str, RunRow | CompareRow], prepared: Prepared) -> dict:
    """Scores of the base and every run on eval.validation_sets (``validation``) and,
    with a merge section, each run's merge curve; returns the curves for report.json."""
    models = {"base": cfg.model.name_or_path, **{n: r.model_dir for n, r in results.items()}}
    if validation_config(cfg) is not None:  # minutes of silence otherwise, between training and the report
        log.info("scoring %d models on the validation sets", len(models))
    scored = score_validation(cfg, models, prepared.validation)
    if scored:
        base["validation"] = scored.pop("base")
        for name, s in scored.items():
            results[name].validation = s
    if cfg.merge is None:
        return {}
    wanted = cfg.merge.methods
    models = {n: r.model_dir for n, r in results.items() if not wanted or r.method in wanted}
    # A curve's ends are models scored above; not with lm_eval sets, which merges skip.
    known = {} if harness.harness_sets(cfg) else {n: _curve_ends(cfg.merge.mode, base, results[n]) for n in models}
    log.info("merge curves (%s) of %s: %d knobs each", cfg.merge.mode, ", ".join(models), len(cfg.merge.knob_values()))
    return curves_json(merge_curves(cfg, models, EvalGroups.of(prepared.eval, prepared.validation), known=known))


def _curve_ends(mode: str, base: dict, run: RunRow | CompareRow) -> dict[float, MergePoint]:
    """The points of a run's merge curve that are models already scored: the trained
    model (α = 1, λ = 0) and, for a linear merge, the base (α = 0)."""
    test = ("eval", "S_D", "S_G", "S")
    trained = 1.0 if mode == "linear" else 0.0
    ends = {trained: MergePoint(trained, {k: run.scores[k] for k in test}, run.validation)}
    if mode == "linear":
        ends[0.0] = MergePoint(0.0, {k: base[k] for k in test}, base.get("validation"))
    return ends
