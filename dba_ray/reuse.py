"""What a run reuses from earlier ones, and the checks that decide it: the pretrained
base model (cached by the settings it depends on) and ĝ_G (reused when made for the same
model, data and Stage 1 settings). Used by `run`, `compare`, `tune` and preflight."""

from __future__ import annotations

import json

from dba_ray import artifact, storage
from dba_ray.config import Config, digest
from dba_ray.data import describe_source
from dba_ray.errors import UserError
from dba_ray.global_gradient import stage1_settings
from dba_ray.model import load_empty_model, model_source


def pretrain_plan(cfg: Config) -> tuple[Config, str, str]:
    """(the pretraining run's config, its cache folder, the model folder it leaves)."""
    p = cfg.pretrain
    pre = cfg.model_copy(deep=True)
    pre.train.data, pre.train.max_records = p.data, None
    pre.train.max_steps, pre.train.batch_size, pre.train.grad_accum = p.max_steps, p.batch_size, 1
    pre.train.eval_every, pre.train.checkpoint_every = p.eval_every, p.checkpoint_every
    pre.eval.sets = [s for s in cfg.eval.sets if s.kind == "general"]
    # Only what shapes the pretrained weights: a new fine-tuning setting keeps the cache.
    t = pre.train
    key = digest(
        [
            pre.model_dump(include={"model", "pretrain"}, exclude={"pretrain": {"checkpoint_every"}}),
            t.optimizer.model_dump(),
            t.num_workers,
            t.seed,
            t.use_gpu,
        ]
    )
    base_dir = storage.join(storage.absolute(cfg.output_dir), "pretrain", key)
    return pre, base_dir, storage.join(base_dir, "pretrain", "model")  # run_train's layout


def planned_base(cfg: Config) -> Config:
    """``cfg`` with ``model`` pointing at the base model a run will use, trained or not."""
    if cfg.pretrain is None:
        return cfg
    model_dir = pretrain_plan(cfg)[2]
    out = cfg.model_copy(deep=True)
    out.model.name_or_path = model_dir
    out.model.tokenizer = out.model.tokenizer or model_dir
    out.pretrain = None
    return out


def _jsonable(x):
    return json.loads(json.dumps(x))


def stage1_mismatch(cfg: Config, meta: artifact.ArtifactMeta, check_shapes: bool = True) -> str | None:
    """What the artifact ``meta`` describes was made differently from what Stage 1 would
    make for ``cfg`` (a phrase for a message), or None when it can be reused."""
    if cfg.stage1.data is None:
        return "general data (this config has no stage1.data)"
    checks = [
        ("base model", meta.base_model, _jsonable(model_source(cfg.model))),
        ("model dtype", meta.dtype, cfg.model.dtype),
        ("general data", meta.data_description, _jsonable(describe_source(cfg.stage1.data))),
        ("Stage 1 settings", meta.stage1_settings, stage1_settings(cfg.stage1)),
    ]
    for what, made, wanted in checks:
        if made != wanted:
            if what == "base model":
                return f"base model ({made['name_or_path']}, this config: {wanted['name_or_path']})"
            return what
    if check_shapes:
        shapes = artifact.parameter_shapes(load_empty_model(cfg.model))
        if meta.param_fingerprint != artifact.fingerprint_of(shapes):
            return "model architecture"
    return None


def refuse_replacing(uri: str, differs: str) -> UserError:
    return UserError(
        f"the global gradient at {uri} was made with another {differs}: set stage1.output to "
        "another place for this config, or stage1.overwrite: true to replace it"
    )
