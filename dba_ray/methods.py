"""What each method trains with: DBA and its baselines as settings of one trainer.

A run is a :class:`MethodSpec`: a method (``config.METHODS``) whose own settings
are applied to ``train`` first, then the spec's overrides (so an ablation such as
``{method: direct, set: {schedule.anneal: true}}`` can turn a forced setting back on).
"""

from __future__ import annotations

from typing import Sequence

from pydantic import ValidationError

from dba_ray.config import (
    Config,
    DBAConfig,
    MethodSpec,
    TrainConfig,
    _set_dotted,
    flatten,
    format_validation_error,
)
from dba_ray.errors import UserError


def uses_global_gradient(d: DBAConfig) -> bool:
    return d.ggb or d.dc != "none" or d.anchor != "none"


def needs_stage1(cfg: Config, specs: Sequence[MethodSpec]) -> bool:
    """ĝ_G is needed by a method that uses it, and v_G by a fisher merge."""
    merge_fisher = cfg.merge is not None and cfg.merge.mode == "fisher"
    return merge_fisher or any(uses_global_gradient(config_for_run(cfg, spec).train.dba) for spec in specs)


def as_spec(method: str | MethodSpec) -> MethodSpec:
    return method if isinstance(method, MethodSpec) else MethodSpec.model_validate(method)


def phase_name(spec: MethodSpec) -> str:
    """How messages name the run of ``spec``."""
    return "pretraining" if spec.method == "pretrain" else f"stage 2 ({spec.name})"


def config_for_run(cfg: Config, method: str | MethodSpec) -> Config:
    """``cfg`` with ``train`` as this run trains (method settings, then overrides)."""
    spec = as_spec(method)
    out = cfg.model_copy(deep=True)
    t = out.train
    if spec.method != "dba":
        # Every baseline is vanilla fine-tuning: no GGB, no DC, no anchor, constant lr.
        t.dba = t.dba.model_copy(update={"ggb": False, "dc": "none", "anchor": "none"})
        t.schedule = t.schedule.model_copy(update={"anneal": False})
    if spec.method == "pretrain":
        if cfg.pretrain is None:
            raise UserError("method 'pretrain' needs a pretrain section")
        t.schedule = cfg.pretrain.schedule
    if spec.set:
        tree = t.model_dump()
        for key, value in flatten(spec.set).items():  # nested or dotted: merged, not replaced
            _set_dotted(tree, key.split("."), value)
        try:
            out.train = TrainConfig.model_validate(tree)
        except ValidationError as e:
            raise UserError(format_validation_error(e, f"(method {spec.name!r}, set: under train)")) from None
    if spec.method == "lora" and out.train.parallel == "fsdp":
        raise UserError(
            f"{spec.name}: lora runs with train.parallel: ddp (adapters are small; FSDP is for full weights)"
        )
    if spec.method == "lora" and uses_global_gradient(out.train.dba):
        raise UserError(
            f"{spec.name}: GGB, DC and the fisher anchor act on the full weights' gradient; "
            "lora trains adapters only (use method: dba)"
        )
    return out
