"""Tokenized data as arrays in Ray's object store: the domain data, the eval sets and
the mixture's general data, each tokenized once by a command and shared by its runs
(``dba_ray.prepare`` makes them; ``run_train`` makes its own when called alone)."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import ray

from dba_ray.config import Config, TrainConfig
from dba_ray.data.order import mixture_domain_rows, mixture_general_count
from dba_ray.data.pipeline import build_sequences, collect_arrays
from dba_ray.data.records import read_choice_records, read_text_records
from dba_ray.data.tokenize import choice_arrays, record_arrays
from dba_ray.errors import UserError
from dba_ray.ray_runtime import ensure_ray
from dba_ray.tokenizer import load_tokenizer


class EvalData(NamedTuple):
    """Tokenized eval sets: object refs of their arrays, and their kinds (domain or
    general), by set name. lm_eval sets are not here: they score the saved model."""

    refs: dict[str, ray.ObjectRef]
    kinds: dict[str, str]


def tokenize_eval(cfg: Config, sets=None) -> EvalData:
    """Tokenize every eval set (or ``sets``, e.g. the validation sets) once."""
    ensure_ray(cfg.ray)
    refs, kinds = {}, {}
    for s in cfg.eval.sets if sets is None else sets:
        if s.type == "lm_eval":  # scored on the saved model (dba_ray/harness.py)
            continue
        if s.type == "choice":
            records = read_choice_records(s.data)[: cfg.eval.max_sequences]
            arrays = choice_arrays(records, load_tokenizer(cfg.model), s.data.seq_len)
        elif s.per_record:
            texts = read_text_records(s.data)[: cfg.eval.max_sequences]
            arrays = record_arrays(texts, load_tokenizer(cfg.model), s.data.seq_len)
        else:
            seqs = build_sequences(s.data, cfg.model, concurrency=cfg.ray.tokenize_concurrency)
            arrays = collect_arrays(seqs, limit=cfg.eval.max_sequences)
        if len(arrays["input_ids"]) == 0:
            raise UserError(f"eval set {s.name!r} produced no sequences")
        refs[s.name], kinds[s.name] = ray.put(arrays), s.kind
    return EvalData(refs, kinds)


def tokenize_train(cfg: Config) -> ray.ObjectRef:
    """Tokenize the domain data once, into the object store."""
    if cfg.train.data is None:
        raise UserError("train.data is required: the domain data to fine-tune on")
    ensure_ray(cfg.ray)
    arrays = collect_arrays(
        build_sequences(
            cfg.train.data, cfg.model, max_records=cfg.train.max_records, concurrency=cfg.ray.tokenize_concurrency
        )
    )
    return ray.put(arrays)


def tokenize_general(cfg: Config, n: int) -> ray.ObjectRef:
    """The first ``n`` general sequences for the mixture baseline, tokenized at the
    domain data's sequence length (so the two stack into one array)."""
    source = cfg.train.mixture.data or cfg.stage1.data
    if source is None:
        raise UserError("method mixture needs general data: set train.mixture.data or stage1.data")
    source = source.model_copy(update={"seq_len": cfg.train.data.seq_len})
    ensure_ray(cfg.ray)
    seqs = build_sequences(source, cfg.model, concurrency=cfg.ray.tokenize_concurrency)
    arrays = collect_arrays(seqs, limit=n)
    if len(arrays["input_ids"]) == 0:
        raise UserError(
            f"the mixture's general data {source.path or source.hf_dataset} has no sequences: "
            "point train.mixture.data (or stage1.data) at general text"
        )
    return ray.put(arrays)


def general_for_mixtures(cfg: Config, train_ref: ray.ObjectRef, trains: Sequence[TrainConfig]) -> ray.ObjectRef:
    """General sequences enough for every mixture run of ``trains`` (each run's own,
    resolved settings: its ratio, steps and batch decide how many it mixes in), shared."""
    n = len(ray.get(train_ref)["input_ids"])
    need = max(mixture_general_count(len(mixture_domain_rows(t, n)), t.mixture.ratio) for t in trains)
    return tokenize_general(cfg, need)
