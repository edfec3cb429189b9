"""Stage 1: the global gradient ĝ_G of general data at the base weights.

A TorchTrainer whose workers stream their shard of the general data and run forward
and backward with no optimizer: parameters never change. Each worker keeps the fp32
sum of per-token loss gradients and its token count (under ``stage1.parallel: fsdp``
its rows of them, summed over workers at every micro-batch; otherwise, without v_G,
its own, joined by one all-reduce at the end), giving ĝ_G = Σ grads / Σ tokens, the
exact token-weighted mean gradient (the limit the paper reaches with
zero-learning-rate Adam and β1 → 1).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import psutil
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.data import ExecutionOptions
from ray.train import DataConfig as TrainDataConfig
from ray.train import FailureConfig, LoggingConfig, RunConfig
from ray.train.torch import TorchTrainer

from dba_ray import artifact, console, sharding, storage, tracking
from dba_ray.config import Config
from dba_ray.data import build_sequences, describe_source
from dba_ray.data.tokenize import IGNORE
from dba_ray.dba import local
from dba_ray.errors import UserError, find_user_error
from dba_ray.loss import token_loss_sum
from dba_ray.model import load_model, model_source
from dba_ray.progress import ProgressPrinter, new_tracker
from dba_ray.ray_runtime import check_fits, ensure_ray, scaling

log = logging.getLogger("dba_ray")
DATASET = "general"
_MASK64 = (1 << 64) - 1


@dataclass
class Stage1Result:
    meta: dict
    uri: str | None  # where the artifact was written
    ref: ray.ObjectRef | None  # the GlobalGradient in the object store, if asked


def sequence_hash(input_ids, labels) -> int:
    """Order-free fingerprint term of one sequence (summed mod 2^64 over the data)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(input_ids.tobytes())
    h.update(labels.tobytes())
    return int.from_bytes(h.digest(), "little")


class _Sums:
    """One worker's running sums over its shard of the general data: fp32 gradient sums
    (and squared micro-batch gradients for v_G), tokens, loss, sequences, micro-batches,
    the longest sequence and the order-free data fingerprint.

    Under ``sharded`` (stage1.parallel fsdp) every buffer is this rank's dim-0 rows of
    each parameter: FSDP2 reduce-scatters each micro-batch's gradient, summed over the
    workers (divide factor 1), so the sums are already global and nothing is reduced at
    the end. Workers then run in lockstep: one micro-batch each per step, a worker whose
    shard is done running an empty one. DDP workers run in lockstep too when v_G is kept
    on more than one worker (each micro-batch's gradient summed over workers, so v_G
    squares the same global micro-batch gradient as under fsdp); otherwise each sums its
    own and one all-reduce at the end joins them.
    """

    def __init__(self, model: torch.nn.Module, second_moment: bool, device: torch.device, sharded: bool):
        self.model = model
        self.params = dict(model.named_parameters())
        self.device = device
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.sharded = sharded
        self.lockstep = sharded or (second_moment and self.world > 1)
        # fp32 weights let .grad itself hold the running sum; otherwise (bf16 weights, or
        # when each micro-batch gradient is needed for v_G) sum into fp32 buffers.
        separate = second_moment or any(p.dtype != torch.float32 for p in self.params.values())
        self.grads = self._zeros() if separate else None
        self.sq = self._zeros() if second_moment else None
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.sequences = self.batches = self.steps = self.seq_len = 0
        self.data_hash = 0

    def _zeros(self) -> dict[str, torch.Tensor]:
        """fp32 buffers the size of this rank's part of each parameter."""
        return {n: torch.zeros_like(local(p), dtype=torch.float32) for n, p in self.params.items()}

    def add(self, batch: dict | None) -> bool:
        """Forward and backward on one micro-batch (None: this worker's shard is done);
        its gradient joins the sums. False once there is nothing left to add: this
        worker's shard is done, or, in lockstep, every worker's."""
        n_local = 0 if batch is None else int((batch["labels"][:, 1:] != IGNORE).sum())
        n_step = n_local
        if self.lockstep:
            step = torch.tensor([batch is not None, n_local], dtype=torch.float64, device=self.device)
            dist.all_reduce(step)
            if step[0] == 0:
                return False
            n_step = float(step[1])  # the global micro-batch's trained tokens
            self.steps += 1
        elif batch is None:
            return False
        if batch is None:  # an empty micro-batch: this worker's part of a collective step
            ids_np = np.zeros((1, 2), dtype=np.int64)
            labels_np = np.full((1, 2), IGNORE, dtype=np.int64)
        else:
            ids_np, labels_np = batch["input_ids"], batch["labels"]
            self._count(ids_np, labels_np)
        ids = torch.from_numpy(ids_np.astype(np.int64)).to(self.device, non_blocking=True)
        labels = torch.from_numpy(labels_np.astype(np.int64)).to(self.device, non_blocking=True)
        loss, _ = token_loss_sum(self.model, ids, labels)
        loss.backward()
        self.loss += loss.detach()
        if self.grads is not None:
            self._move_grads(n_step)
        return True

    def _count(self, ids_np: np.ndarray, labels_np: np.ndarray) -> None:
        self.seq_len = max(self.seq_len, ids_np.shape[1])
        for i in range(len(ids_np)):
            self.data_hash = (self.data_hash + sequence_hash(ids_np[i], labels_np[i])) & _MASK64
        self.tokens += int((labels_np[:, 1:] != IGNORE).sum())
        self.sequences += len(ids_np)
        self.batches += 1

    def _move_grads(self, n_step: float) -> None:
        """The micro-batch's gradient into the fp32 sums (and its square, scaled to the
        square of the global micro-batch's mean gradient, into v_G's)."""
        inv_n2 = max(n_step, 1.0) ** -2
        for name, p in self.params.items():
            g = local(p.grad).float()
            if self.lockstep and not self.sharded:
                dist.all_reduce(g)  # FSDP's reduce-scatter already summed it
            self.grads[name] += g
            if self.sq is not None:
                self.sq[name].addcmul_(g, g, value=inv_n2)
            p.grad = None

    def reduce(self, loop_s: float) -> "_Totals":
        """Join the workers' sums (the gradient sums in place, unless they already are
        global); the totals."""
        if self.grads is None:
            self.grads = {
                n: (local(p.grad) if p.grad is not None else torch.zeros_like(local(p))).float()
                for n, p in self.params.items()
            }
        counts = torch.tensor(
            [float(self.tokens), float(self.loss), self.sequences, self.batches],
            dtype=torch.float64,
            device=self.device,
        )
        maxima = torch.tensor([self.seq_len, loop_s], dtype=torch.float64, device=self.device)
        hashes = [self.data_hash]
        if self.world > 1:
            dist.all_reduce(counts)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            if not self.lockstep:
                for t in self.grads.values():
                    dist.all_reduce(t)
            hashes = [None] * self.world
            dist.all_gather_object(hashes, self.data_hash)
        tokens, loss, sequences, batches = counts.tolist()
        return _Totals(
            tokens,
            loss,
            int(sequences),
            int(batches),
            self.steps if self.lockstep else int(batches),
            int(maxima[0]),
            float(maxima[1]),
            f"{sum(hashes) & _MASK64:016x}",
        )


@dataclass
class _Totals:
    tokens: float
    loss: float
    sequences: int
    batches: int
    global_batches: int  # v_G's count: global micro-batches (one per worker and step)
    seq_len: int  # the longest sequence
    loop_s: float  # the slowest worker's streaming time
    fingerprint: str


def _stream(sums: _Sums, batch_size: int, tracker, timeline: dict) -> float:
    """Every micro-batch of this worker's shard into ``sums``, with progress; the
    streaming time from the first batch to the end (start-up excluded)."""
    # Progress counts token positions (sequences × seq_len), the unit of max_tokens.
    positions = reported = 0
    last_report = time.monotonic()
    first_batch_at = None
    batches = iter(ray.train.get_dataset_shard(DATASET).iter_batches(batch_size=batch_size, batch_format="numpy"))
    while True:
        batch = next(batches, None)
        if first_batch_at is None:
            first_batch_at, timeline["first_batch"] = time.monotonic(), time.time()
        if not sums.add(batch):
            break
        positions += 0 if batch is None else batch["input_ids"].size
        if time.monotonic() - last_report > 1.0:
            tracker.add.remote(tokens=positions - reported)
            reported, last_report = positions, time.monotonic()
    tracker.add.remote(tokens=positions - reported)
    timeline["loop_done"] = time.time()
    return time.monotonic() - first_batch_at if first_batch_at else 0.0


def _worker_loop(config: dict) -> None:
    cfg = Config.model_validate(config["cfg"])
    s1 = cfg.stage1
    tracker = config["tracker"]
    timeline = dict(config["timeline"], worker_started=time.time())
    torch.set_num_threads(s1.cpus_per_worker)
    device = ray.train.torch.get_device()
    sharded = s1.parallel == "fsdp"
    if sharded and config["output"] is not None:
        _check_shared_output(config["output"])

    model = load_model(cfg.model).to(device)
    if sharded:
        sharding.shard_model(model, sum_gradients=True)
    timeline["model_built"] = time.time()
    model.eval()  # no dropout: the gradient of the deterministic loss at θ0
    sums = _Sums(model, s1.second_moment, device, sharded)
    loop_s = _stream(sums, s1.batch_size, tracker, timeline)
    totals = sums.reduce(loop_s)
    timeline["reduced"] = time.time()
    if totals.tokens == 0:
        raise UserError(f"general data {config['source']} produced no trainable tokens")
    if sharded or ray.train.get_context().get_world_rank() == 0:
        _keep_result(config, cfg, sums, totals, timeline)


def _check_shared_output(uri: str) -> None:
    """Under fsdp every worker writes its rows into the artifact's folder: a local path
    must be one they all see (one node, or a shared filesystem). Asked before any data
    is read: rank 0 makes a probe folder beside it and every worker looks for it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 or storage.is_remote(uri):
        return
    rank = dist.get_rank()
    probe = [None]
    if rank == 0:
        parent = os.path.dirname(uri.rstrip("/"))
        os.makedirs(parent, exist_ok=True)
        probe = [tempfile.mkdtemp(prefix=".dba-ray-probe-", dir=parent)]
    dist.broadcast_object_list(probe, src=0)
    seen = torch.tensor([float(os.path.isdir(probe[0]))], device=ray.train.torch.get_device())
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    if rank == 0:
        os.rmdir(probe[0])
    if seen.item() == 0:
        raise UserError(
            f"stage1.output {uri} is a local path that not every Stage 1 worker can see: under "
            "stage1.parallel fsdp each worker writes its own rows there; use an s3:// or gs:// "
            "URI or a filesystem every node mounts"
        )


class _EveryRowSplit(TrainDataConfig):
    """Ray Train's own split is ``equal=True``, which drops up to num_workers − 1 rows so
    that every shard has as many; ĝ_G is the mean over every row, so shards here may
    differ by one row (Stage 1 has no per-step collective that needs them equal)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        ds = datasets[DATASET].copy(datasets[DATASET])
        ds.context.execution_options = self._resolve_execution_options(DATASET)
        splits = ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
        return [{DATASET: split} for split in splits]


def _keep_result(config: dict, cfg: Config, sums: _Sums, totals: _Totals, timeline: dict) -> None:
    """ĝ_G (and v_G) from the reduced sums, written (by rank 0; under fsdp by every rank,
    its own rows) and/or put in the object store; rank 0 hands its metadata to the
    driver through the tracker."""
    s1, tracker = cfg.stage1, config["tracker"]
    mean = {n: (t / totals.tokens).cpu() for n, t in sums.grads.items()}
    second = {n: (t / totals.global_batches).cpu() for n, t in sums.sq.items()} if sums.sq is not None else None
    stats = artifact.Stats(
        tokens=int(totals.tokens),
        sequences=totals.sequences,
        batches=totals.batches,
        loss_sum=totals.loss,
        data_fingerprint=totals.fingerprint,
        extra={
            "num_workers": s1.num_workers,
            "batch_size": s1.batch_size,
            "parallel": s1.parallel,
            "global_batches": totals.global_batches,
            "skipped_records": ray.get(tracker.snapshot.remote())["skipped"],
            "loop_seconds": totals.loop_s,
            # Rank 0's peak device memory so far (GPU workers): what `dba-ray plan` predicts.
            "device_peak_bytes": torch.cuda.max_memory_allocated(sums.device) if sums.device.type == "cuda" else None,
            "stage1_settings": stage1_settings(s1),
            # From the driver's start of the job: what a later run reusing ĝ_G is charged.
            "wall_s": time.time() - timeline["job_started"],
            # Rank 0's clock, seconds from the start of the process that ran the job: where
            # the fixed start-up cost goes (benchmarks/stage1_throughput.py reads it).
            "timeline": {k: round(v - timeline["process_started"], 3) for k, v in timeline.items()},
        },
    )
    meta = artifact.build_meta(
        mean,
        artifact.parameter_shapes(sums.model),
        stats,
        base_model=model_source(cfg.model),
        data=config["data_description"],
        seq_len=totals.seq_len,
        dtype=cfg.model.dtype,
        description=s1.description,
        has_second_moment=second is not None,
        norms=_global_norms(mean, sums.device) if sums.sharded else None,
    )
    uri = config["output"]
    if sums.sharded:
        meta = _save_rows(uri, s1, mean, second, meta)
    else:
        grad = artifact.GlobalGradient(mean=mean, meta=meta, second_moment=second)
        if uri is not None:
            meta = artifact.save(uri, grad, overwrite=s1.overwrite, svd_rank=s1.svd_rank, save_dtype=s1.save_dtype)
        if s1.to_object_store:
            ray.get(tracker.set_result.remote("grad", grad))
    if ray.train.get_context().get_world_rank() == 0:
        ray.get(tracker.set_result.remote("meta", meta))


def _global_norms(rows: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Each tensor's L2 norm from every rank's rows of it."""
    squares = torch.tensor([float(t.double().pow(2).sum()) for t in rows.values()], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(squares)
    return {n: math.sqrt(v) for n, v in zip(rows, squares.tolist())}


def _save_rows(uri: str, s1, mean: dict, second: dict | None, meta: dict) -> dict:
    """Every rank writes its rows of ĝ_G (and v_G) into the artifact's folder; rank 0
    opens the folder, names it to the others, and commits it with meta.json once every
    rank's files are in."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    parts = {"mean_gradient": mean, **({"second_moment": second} if second is not None else {})}

    def write(target: str) -> dict:
        files = artifact.write_parts(target, parts, save_dtype=s1.save_dtype, block=(rank, world))
        everyone = [files]
        if world > 1:
            everyone = [None] * world
            dist.all_gather_object(everyone, files)
        return {name: info for ranks_files in everyone for name, info in ranks_files.items()}

    if rank != 0:
        target = [None]
        dist.broadcast_object_list(target, src=0)
        write(target[0])
        return meta
    with storage.atomic_directory(uri, overwrite=s1.overwrite, marker=artifact.META) as target:
        if world > 1:
            dist.broadcast_object_list([target], src=0)
        meta = dict(
            meta,
            format_version=artifact.FORMAT_VERSION,
            save_dtype=s1.save_dtype,
            compression=None,
            files=write(target),
        )
        artifact.write_meta(target, meta)
    return meta


def stage1_settings(s1) -> dict:
    """The Stage 1 options that change the artifact (recorded, to decide reuse); with
    v_G, the global micro-batch it squares (its noise, so its size, depends on that)."""
    settings = s1.model_dump(include={"max_tokens", "max_records", "second_moment", "svd_rank", "save_dtype"})
    if s1.second_moment:
        settings["global_micro_batch"] = s1.batch_size * s1.num_workers
    return settings


def run_global_gradient(cfg: Config, *, dataset: ray.data.Dataset | None = None, write: bool = True) -> Stage1Result:
    """Run Stage 1 on the configured cluster.

    ``dataset``: a Ray Dataset of ``input_ids`` / ``labels`` rows to use instead of
    ``stage1.data`` (for callers that build their own). ``write=False`` keeps the result
    only in the object store (``stage1.to_object_store`` must then be on).
    """
    timeline = {"process_started": psutil.Process().create_time(), "job_started": time.time()}
    s1 = cfg.stage1
    if dataset is None and s1.data is None:
        raise UserError("stage1.data is required: the general data to compute ĝ_G on")
    uri = storage.absolute(cfg.stage1_output()) if write else None
    if uri is None and not s1.to_object_store:
        raise UserError("nothing to keep: set stage1.output or stage1.to_object_store")
    if uri is not None and storage.exists(uri) and not s1.overwrite:
        raise UserError(f"{uri} already exists (set stage1.overwrite=true to replace it)")

    ensure_ray(cfg.ray)
    timeline["ray_ready"] = time.time()
    check_fits("stage 1", "stage1", s1, cfg.ray)
    tracker = new_tracker()
    dataset, description, source, budget = _stage1_input(cfg, dataset, tracker)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "tracker": tracker,
            "output": uri,
            "source": source,
            "data_description": description,
            "timeline": {**timeline, "fit_called": time.time()},
        },
        scaling_config=scaling(s1.num_workers, s1.cpus_per_worker, s1.use_gpu, cfg.ray),
        datasets={DATASET: dataset},
        # Ordered execution makes the token budget take the same rows every run.
        dataset_config=_EveryRowSplit(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=f"stage1-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            **storage.ray_storage(_train_storage(cfg)),
            failure_config=FailureConfig(max_failures=s1.max_failures),
            logging_config=LoggingConfig(log_level=console.train_log_level()),
        ),
    )
    log.info("stage 1: global gradient of %s on %d worker(s)", source, s1.num_workers)
    start = time.monotonic()
    with ProgressPrinter(tracker, "stage1", budget, s1.progress_interval_s):
        try:
            trainer.fit()
        except Exception as e:  # Train wraps worker errors; surface the user's message
            user = find_user_error(e)
            if user is not None:
                raise user from None
            raise
    meta = ray.get(tracker.take_result.remote("meta"))
    made = artifact.ArtifactMeta(meta)
    if made.skipped_records:
        snap = ray.get(tracker.snapshot.remote())
        log.warning("skipped %d malformed records (first: %s)", snap["skipped"], snap["first_skip"])
    elapsed = time.monotonic() - start
    log.info(
        "stage 1 done: %d tokens, %d sequences in %.1fs (%.0f tokens/s), |ĝ_G| = %.4g%s",
        made.tokens,
        made.sequences,
        elapsed,
        made.tokens / elapsed,
        made.global_norm,
        f", written to {uri}" if uri else "",
    )
    ref = tracker.take_result.remote("grad") if s1.to_object_store else None
    tracking.log_stage1(cfg, made, elapsed)
    return Stage1Result(meta=meta, uri=uri, ref=ref)


def _stage1_input(cfg: Config, dataset: ray.data.Dataset | None, tracker) -> tuple:
    """The rows Stage 1 streams (the caller's Dataset, or ``stage1.data`` tokenized), how
    the artifact's meta describes them, and the token budget the progress line counts to."""
    s1 = cfg.stage1
    if dataset is not None:
        return dataset, {"dataset": "a Ray Dataset given by the caller"}, "a caller's Ray Dataset", None
    dataset = build_sequences(
        s1.data,
        cfg.model,
        max_records=s1.max_records,
        max_tokens=s1.max_tokens,
        tracker=tracker,
        concurrency=cfg.ray.tokenize_concurrency,
    )
    budget = None if s1.max_tokens is None else math.ceil(s1.max_tokens / s1.data.seq_len) * s1.data.seq_len
    return dataset, describe_source(s1.data), s1.data.path or s1.data.hf_dataset, budget


def _train_storage(cfg: Config) -> str:
    """Ray Train's run directory: beside the outputs, local or cloud."""
    return storage.join(storage.absolute(cfg.output_dir), "ray_train")
