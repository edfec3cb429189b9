"""One preparation step for the commands that train (`run`, `compare`, `tune`): what
their Stage 2 runs share, made once, as a :class:`Prepared`.

In order: the domain data (tokenized first, with the configured tokenizer, which a
pretrained base keeps, so that a data problem is refused before hours of work), the
mixture's general data, the base model (pretrained once when the config has a
``pretrain`` section), ĝ_G (reused or computed by Stage 1), the eval and the
validation sets. The data path then runs one way: command → ``prepare`` →
``dba_ray.trials`` / ``dba_ray.trainer`` → the worker loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import ray

from dba_ray import storage
from dba_ray.artifact import ArtifactMeta
from dba_ray.config import Config, MethodSpec, TrainConfig
from dba_ray.data.arrays import EvalData, general_for_mixtures, tokenize_eval, tokenize_train
from dba_ray.errors import UserError
from dba_ray.global_gradient import run_global_gradient
from dba_ray.methods import config_for_run
from dba_ray.ray_runtime import ensure_ray
from dba_ray.reuse import planned_base, pretrain_plan, refuse_replacing, stage1_mismatch
from dba_ray.trainer import run_train

log = logging.getLogger("dba_ray")


@dataclass
class Stage1Summary:
    """The ĝ_G a command's runs use and what it cost: report.json's ``stage1``."""

    uri: str
    reused: bool  # an artifact made earlier (by this config or given in train.global_gradient)
    wall_s: float  # the Stage 1 job's wall time (for a reused artifact, that of the job that made it)
    tokens: int  # general tokens Stage 1 read

    def as_json(self) -> dict:
        return asdict(self)  # {"uri", "reused", "wall_s", "tokens"}


@dataclass
class Prepared:
    """What every Stage 2 run of one command shares (data as object refs: tokenized once)."""

    cfg: Config  # the command's config, ``model`` pointing at the base the runs start from
    train: ray.ObjectRef  # the tokenized domain data
    eval: EvalData  # eval.sets (for `tune`: the sets it selects on)
    validation: EvalData | None  # eval.validation_sets, when there are any
    general: ray.ObjectRef | None  # general sequences for the mixture runs, when there are any
    stage1: Stage1Summary | None  # ĝ_G, when a run (or a fisher merge) needs it

    @property
    def grad_source(self) -> str | None:
        return self.stage1.uri if self.stage1 else None

    def run_train_data(self) -> dict:
        """The keyword arguments that hand this data to ``run_train``."""
        return {
            "grad_source": self.grad_source,
            "train_ref": self.train,
            "eval_refs": self.eval,
            "general_ref": self.general,
        }


def prepare(
    cfg: Config, *, mixtures: Sequence[TrainConfig] = (), stage1: bool = False, validation: bool = True
) -> Prepared:
    """``mixtures``: the resolved train sections of the mixture runs (their ratios, steps
    and batches size the general data); ``stage1``: whether ĝ_G is needed;
    ``validation``: whether to tokenize eval.validation_sets too."""
    ensure_ray(cfg.ray)
    train = tokenize_train(cfg)
    general = general_for_mixtures(cfg, train, mixtures) if mixtures else None
    cfg = ensure_base_model(cfg)
    grad = ensure_global_gradient(cfg) if stage1 else None
    eval_data = tokenize_eval(cfg)
    val = tokenize_eval(cfg, cfg.eval.validation_sets) if validation and cfg.eval.validation_sets else None
    return Prepared(cfg=cfg, train=train, eval=eval_data, validation=val, general=general, stage1=grad)


def mixture_trains(cfg: Config, specs: Sequence[MethodSpec]) -> list[TrainConfig]:
    """The train sections the mixture runs among ``specs`` train with."""
    return [config_for_run(cfg, s).train for s in specs if s.method == "mixture"]


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


def ensure_global_gradient(cfg: Config) -> Stage1Summary:
    """Reuse the artifact if it was made for this model and these data; else run Stage 1.
    An artifact made differently is replaced only with ``stage1.overwrite``: it may be
    another config's, and hours of compute at real scale."""
    uri = storage.absolute(cfg.global_gradient_source())
    if cfg.train.global_gradient is not None:
        meta = ArtifactMeta.read(uri)
        return Stage1Summary(uri=uri, reused=True, wall_s=meta.wall_s, tokens=meta.tokens)
    if storage.exists(storage.join(uri, "meta.json")):
        meta = ArtifactMeta.read(uri)
        differs = stage1_mismatch(cfg, meta)
        if differs is None:
            log.info("reusing the global gradient at %s", uri)
            return Stage1Summary(uri=uri, reused=True, wall_s=meta.wall_s, tokens=meta.tokens)
        if not cfg.stage1.overwrite:
            raise refuse_replacing(uri, differs)
        log.info("the global gradient at %s was made with another %s: replacing it (stage1.overwrite)", uri, differs)
    s1 = cfg.model_copy(deep=True)
    # Nothing complete is there (never loaded: an interrupted write), or replacing it
    # was allowed above.
    s1.stage1.overwrite = True
    start = time.monotonic()
    result = run_global_gradient(s1)
    return Stage1Summary(
        uri=uri, reused=False, wall_s=time.monotonic() - start, tokens=ArtifactMeta(result.meta).tokens
    )
