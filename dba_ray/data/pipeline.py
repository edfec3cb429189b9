"""The Ray Data pipeline: source -> records -> (shuffle, budget) -> sequences."""

from __future__ import annotations

import math

import numpy as np
import ray
import ray.data

from dba_ray import storage
from dba_ray.config import DataConfig, ModelConfig
from dba_ray.data.builtin import PREFIX, builtin_records
from dba_ray.data.records import NormalizeRows, ReadFiles, file_format
from dba_ray.data.tokenize import tokenize_batch
from dba_ray.errors import UserError


def describe_source(cfg: DataConfig) -> dict:
    """What was read, for metadata and messages."""
    desc = cfg.model_dump(exclude_defaults=False)
    if cfg.path is not None and not cfg.path.startswith(PREFIX):
        files = storage.list_files(cfg.path)
        desc["files"] = [{"name": f, "bytes": size} for f, size in files]
    return desc


def _records(cfg: DataConfig, tracker) -> ray.data.Dataset:
    if cfg.path is not None and cfg.path.startswith(PREFIX):
        ds = ray.data.from_items(builtin_records(cfg.path, cfg.text_field))
        return ds.map_batches(NormalizeRows(cfg, cfg.path, tracker), batch_format="numpy")
    if cfg.path is not None:
        files = storage.list_files(cfg.path)
        files = [(f, size) for f, size in files if size > 0]
        if not files:
            raise UserError(f"data source {cfg.path} is empty (no non-empty files)")
        items = [{"file": f, "fmt": file_format(f, cfg.file_format)} for f, _ in files]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.map_batches(ReadFiles(cfg, tracker), batch_size=1)
    return _hf_records(cfg, tracker)


def _hf_records(cfg: DataConfig, tracker) -> ray.data.Dataset:
    import datasets  # here, not above: every Train worker imports this module, few read HF data sets

    name = cfg.hf_dataset
    if storage.exists(name):
        name = storage.absolute(name)
    try:
        if storage.exists(name) and storage.exists(storage.join(name, "dataset_info.json")):
            hf = datasets.load_from_disk(name)
            if isinstance(hf, datasets.DatasetDict):
                hf = hf[cfg.split]
        else:
            hf = datasets.load_dataset(name, cfg.hf_config, split=cfg.split, streaming=cfg.streaming)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot load data set {name!r}: {str(e).splitlines()[0]}") from None
    if not cfg.streaming and len(hf) == 0:
        raise UserError(f"data set {name!r} split {cfg.split!r} is empty")
    if cfg.streaming:
        ds = ray.data.from_huggingface(hf)
    else:
        # A loaded Dataset is an Arrow table already; handing it over in slices skips
        # from_huggingface's hub look-ups (which fail offline) and gives several blocks.
        table = hf.flatten_indices().data.table if hf._indices is not None else hf.data.table
        step = 8192
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)])
    origin = f"{name}[{cfg.split}]"
    return ds.map_batches(NormalizeRows(cfg, origin, tracker), batch_format="numpy")


def build_sequences(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    *,
    max_records: int | None = None,
    max_tokens: int | None = None,
    tracker=None,
    concurrency: int | None = None,
    keys: bool = False,
) -> ray.data.Dataset:
    """A lazy Dataset of ``input_ids`` / ``labels`` rows of ``seq_len`` tokens (and with
    ``keys``, each one's int64 ``key``: see ``sequence_keys``).

    Run it with ``preserve_order`` (as Stage 1 does) so that budgets take the same
    rows every time. ``tracker`` (a ``progress.Tracker`` actor) counts skipped records;
    ``concurrency`` caps the tokenizing tasks (``ray.tokenize_concurrency``).
    """
    ctx = ray.data.DataContext.get_current()
    # Our own progress line replaces Ray Data's bars, which flood a job's log.
    ctx.enable_progress_bars = False
    # Let a UserError from a reader or tokenizer reach the driver as itself, not as a
    # generic "UDF failed" whose cause is lost on the way between processes.
    ctx.raise_original_map_exception = True
    ds = _records(data_cfg, tracker)
    if data_cfg.shuffle_seed is not None:
        ds = ds.random_shuffle(seed=data_cfg.shuffle_seed)
    if max_records is not None:
        ds = ds.limit(max_records)
    ds = ds.map_batches(
        tokenize_batch,
        fn_args=(model_cfg.model_dump_json(), data_cfg.model_dump_json(), keys),
        batch_size=256,
        batch_format="numpy",
        concurrency=concurrency,
    )
    if max_tokens is not None:
        ds = ds.limit(math.ceil(max_tokens / data_cfg.seq_len))
    return ds


def collect_arrays(ds: ray.data.Dataset, limit: int | None = None) -> dict[str, np.ndarray]:
    """Run a sequence Dataset in order and return its ``input_ids`` / ``labels`` as two
    [N, seq_len] int32 arrays (for data small enough to hold: domain and eval sets)."""
    # On the Dataset's own context: a Dataset copies the current DataContext when it is
    # created, so setting the current one now would not reach it (and the rows would come
    # in whichever order the tokenizing tasks finish).
    ds.context.execution_options.preserve_order = True
    if limit is not None:
        ds = ds.limit(limit)
    parts = list(ds.iter_batches(batch_size=4096, batch_format="numpy"))
    if not parts:
        return {"input_ids": np.zeros((0, 0), np.int32), "labels": np.zeros((0, 0), np.int32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in ("input_ids", "labels")}
