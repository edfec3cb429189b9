"""Checks a command makes before it starts anything costly (pretraining, Stage 1, a
training run): whatever the config and the files' sizes can tell is refused here, with
a message naming the thing, instead of hours later."""

from __future__ import annotations

from dba_ray import artifact, storage
from dba_ray.config import Config, MethodSpec
from dba_ray.methods import resolve, uses_global_gradient


def check(cfg: Config, specs: list[MethodSpec]) -> None:
    """Refuse, with a UserError, what would fail or do harm later in `run`, `compare` or
    `tune` training ``specs``."""
    from dba_ray.run import planned_base, refuse_replacing, stage1_mismatch

    needs_grad = any(uses_global_gradient(resolve(cfg, s).train.dba) for s in specs)
    if needs_grad and cfg.train.global_gradient is None and not cfg.stage1.overwrite:
        uri = storage.absolute(cfg.stage1_output())
        if storage.exists(storage.join(uri, artifact.META)):
            base = planned_base(cfg)
            # A base model still to be pretrained has no shapes yet: checked again after.
            known = cfg.pretrain is None or storage.exists(storage.join(base.model.name_or_path, "config.json"))
            differs = stage1_mismatch(base, artifact.read_meta(uri), check_shapes=known)
            if differs is not None:
                raise refuse_replacing(uri, differs)
