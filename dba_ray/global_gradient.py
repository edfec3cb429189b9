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

import ctypes
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
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
from ray.train import DataConfig as TrainDataConfig

from dba_ray import artifact, console, sharding, stage1_checkpoint, storage, tracking
from dba_ray.config import Config, digest
from dba_ray.data import build_sequences, describe_source
from dba_ray.data.tokenize import IGNORE
from dba_ray.dba import local
from dba_ray.errors import UserError, find_user_error
from dba_ray.loss import token_loss_sum
from dba_ray.model import load_model, model_source
from dba_ray.progress import ProgressPrinter, new_tracker
from dba_ray.ray_runtime import LeanTorchTrainer, check_fits, ensure_ray, scaling

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
    shard is done running an empty one. DDP workers with v_G on more than one worker
    sum each micro-batch's gradient over workers (so v_G squares the same global
    micro-batch gradient as under fsdp), in lockstep too; otherwise each sums its own
    and one all-reduce at the end joins them. Checkpoints need lockstep (every worker
    must reach one at the same step), so ``checkpointing`` asks for it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        second_moment: bool,
        device: torch.device,
        sharded: bool,
        checkpointing: bool = False,
    ):
        self.model = model
        self.params = dict(model.named_parameters())
        self.device = device
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.sharded = sharded
        self.sum_each_step = not sharded and second_moment and self.world > 1
        self.lockstep = sharded or self.sum_each_step or checkpointing
        # fp32 weights let .grad itself hold the running sum; otherwise (bf16 weights, or
        # when each micro-batch gradient is needed for v_G) sum into fp32 buffers.
        separate = second_moment or any(p.dtype != torch.float32 for p in self.params.values())
        self.grads = self._zeros() if separate else None
        self.sq = self._zeros() if second_moment else None
        self.buckets = _buckets(self.params)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.sequences = self.batches = self.steps = self.seq_len = 0
        self.data_hash = 0
        self.global_tokens = 0.0  # every worker's trained tokens so far (lockstep only)
        self.keys: list[np.ndarray] = []  # of the sequences counted, for checkpoints
        self.prior_loop_s = 0.0  # streaming time before the checkpoint resumed from
        self.resumed_at = 0  # that checkpoint's trained tokens

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
            self.global_tokens += n_step
        elif batch is None:
            return False
        if batch is None:  # an empty micro-batch: this worker's part of a collective step
            ids_np = np.zeros((1, 2), dtype=np.int64)
            labels_np = np.full((1, 2), IGNORE, dtype=np.int64)
        else:
            ids_np, labels_np = batch["input_ids"], batch["labels"]
            self._count(ids_np, labels_np)
            if "key" in batch:
                self.keys.append(batch["key"])
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
        for names in self.buckets:
            grads = [local(self.params[n].grad).float() for n in names]
            if self.sum_each_step:  # (under fsdp the reduce-scatter summed them)
                grads = _summed_over_workers(grads)
            for name, g in zip(names, grads):
                self.grads[name] += g
                if self.sq is not None:
                    self.sq[name].addcmul_(g, g, value=inv_n2)
                self.params[name].grad = None

    def sum_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors holding the running gradient sums (this rank's rows under fsdp):
        the fp32 buffers, or the gradients themselves."""
        if self.grads is not None:
            return self.grads
        for p in self.params.values():
            if p.grad is None:  # no backward yet (a checkpoint restored before the first)
                p.grad = torch.zeros_like(p)
        return {n: local(p.grad) for n, p in self.params.items()}

    def _global_counts(self, loop_s: float) -> dict:
        """The counts summed (maxima: longest sequence, slowest stream) over workers."""
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
            hashes = [None] * self.world
            dist.all_gather_object(hashes, self.data_hash)
        tokens, loss, sequences, batches = counts.tolist()
        return {
            "tokens": tokens,
            "loss": loss,
            "sequences": int(sequences),
            "batches": int(batches),
            "steps": self.steps,
            "seq_len": int(maxima[0]),
            "loop_s": self.prior_loop_s + float(maxima[1]),
            "data_hash": sum(hashes) & _MASK64,
        }

    def reduce(self, loop_s: float) -> "_Totals":
        """Join the workers' sums (the gradient sums in place, unless they already are
        global); the totals."""
        self.grads = {n: t.float() for n, t in self.sum_tensors().items()}
        if self.world > 1 and not self.sharded and not self.sum_each_step:
            for t in self.grads.values():
                dist.all_reduce(t)
        c = self._global_counts(loop_s)
        return _Totals(
            c["tokens"],
            c["loss"],
            c["sequences"],
            c["batches"],
            self.steps if self.lockstep else c["batches"],
            c["seq_len"],
            c["loop_s"],
            f"{c['data_hash']:016x}",
        )

    def snapshot(self, loop_s: float) -> tuple[dict[str, torch.Tensor], np.ndarray, dict]:
        """This rank's part of a checkpoint (a collective): the sums it holds, the keys
        of the sequences it counted, and the global counts. Under ddp the sums (unless
        already global) and the counts are first joined onto rank 0, the others going on
        from zero, so the end's reduction still counts everything once."""
        sums = self.sum_tensors()
        if self.world > 1 and not self.sharded and not self.sum_each_step:
            for t in sums.values():
                dist.reduce(t, dst=0)
                if self.rank:
                    t.zero_()
        counts = self._global_counts(loop_s)
        self._set_counts(counts if self.rank == 0 else None)
        tensors = {}
        if self.sharded or self.rank == 0:
            tensors = {f"grad::{n}": t for n, t in sums.items()}
            tensors.update({f"sq::{n}": t for n, t in (self.sq or {}).items()})
        keys = np.concatenate(self.keys) if self.keys else np.zeros(0, np.int64)
        return tensors, keys, counts

    def restore(self, restored: stage1_checkpoint.Restored) -> None:
        """Continue from a checkpoint: the sums' rows this rank holds (under ddp rank 0
        takes them whole, the others start from zero), and the counts."""
        rows = sharding.local_rows(self.model) if self.sharded else {}
        buffers = [("grad", self.sum_tensors()), ("sq", self.sq or {})]
        if self.sharded or self.rank == 0:
            for prefix, tensors in buffers:
                for name, t in tensors.items():
                    t.copy_(restored.blocks.read(f"{prefix}::{name}", *rows.get(name, (0, None))))
        self._set_counts(restored.state if self.rank == 0 else None)
        state = restored.state
        self.steps, self.global_tokens, self.seq_len = state["steps"], state["tokens"], state["seq_len"]
        self.prior_loop_s, self.resumed_at = state["loop_s"], int(state["tokens"])
        if self.rank == 0:
            self.keys = [restored.keys]

    def _set_counts(self, counts: dict | None) -> None:
        """Counts that the end's reduction adds up: the given ones, or zero (None)."""
        c = counts or {}
        self.tokens.fill_(c.get("tokens", 0.0))
        self.loss.fill_(c.get("loss", 0.0))
        self.sequences, self.batches = c.get("sequences", 0), c.get("batches", 0)
        self.data_hash = int(c.get("data_hash", 0))


# Gradients summed over ddp workers in one all-reduce per bucket of about this many
# bytes (fp32): a few calls per micro-batch instead of one per tensor, for one bucket's
# copy of extra memory (a larger tensor is a bucket of its own, reduced in place).
BUCKET_BYTES = 64 * 2**20


def _buckets(params: dict[str, torch.Tensor]) -> list[list[str]]:
    """Parameter names in consecutive groups of at most BUCKET_BYTES of fp32."""
    out, size = [[]], 0
    for name, p in params.items():
        n = 4 * local(p).numel()
        if out[-1] and size + n > BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(name)
        size += n
    return out


def _summed_over_workers(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` summed over the workers: one all-reduce of their flat copy."""
    if len(tensors) == 1:
        dist.all_reduce(tensors[0])
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


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


def _stream(sums: _Sums, s1, tracker, timeline: dict, counted: np.ndarray) -> float:
    """Every micro-batch of this worker's shard into ``sums`` (less the sequences a
    checkpoint ``counted``), with progress and checkpoints; the streaming time from the
    first batch to the end (start-up excluded)."""
    # Progress counts token positions (sequences × seq_len), the unit of max_tokens.
    positions = reported = 0
    last_report = time.monotonic()
    first_batch_at = None
    batches = ray.train.get_dataset_shard(DATASET).iter_batches(batch_size=s1.batch_size, batch_format="numpy")
    batches = iter(stage1_checkpoint.unseen(batches, counted, s1.batch_size) if counted.size else batches)
    every = s1.checkpoint_every_tokens
    next_checkpoint = every and (sums.global_tokens // every + 1) * every
    while True:
        batch = next(batches, None)
        if first_batch_at is None:
            first_batch_at, timeline["first_batch"] = time.monotonic(), time.time()
        if not sums.add(batch):
            break
        positions += 0 if batch is None else batch["input_ids"].size
        if every and sums.global_tokens >= next_checkpoint:  # the same step on every worker
            _checkpoint(sums, time.monotonic() - first_batch_at)
            next_checkpoint = (sums.global_tokens // every + 1) * every
        if time.monotonic() - last_report > 1.0:
            tracker.add.remote(tokens=positions - reported)
            reported, last_report = positions, time.monotonic()
    tracker.add.remote(tokens=positions - reported)
    timeline["loop_done"] = time.time()
    return time.monotonic() - first_batch_at if first_batch_at else 0.0


def _return_freed_heap() -> None:
    """Give the heap's free blocks back to the OS (glibc's ``malloc_trim``). On CPU glibc
    keeps the last backward's freed activations (blocks under its mmap threshold), which
    would otherwise stay in the RSS through the reduction and the writing (measured in
    the scale rehearsal: 1.6 GiB of a 7 GiB fsdp rank at 381M parameters)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def _checkpoint(sums: _Sums, loop_s: float) -> None:
    """Every rank writes its part of a checkpoint; Ray Train keeps it once all have."""
    _return_freed_heap()
    tensors, keys, counts = sums.snapshot(loop_s)
    with tempfile.TemporaryDirectory() as d:
        stage1_checkpoint.write(d, sums.rank, sums.world, tensors, keys, counts if sums.rank == 0 else None)
        ray.train.report({"tokens": counts["tokens"]}, checkpoint=ray.train.Checkpoint.from_directory(d))


def _resume(sums: _Sums, tracker) -> np.ndarray:
    """Continue from the job's last checkpoint, if it has one (after lost workers, or a
    driver that ran the same job again); the keys of the sequences it counted."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return np.zeros(0, np.int64)
    with checkpoint.as_directory() as d:
        restored = stage1_checkpoint.read(d)
        sums.restore(restored)
    if sums.rank == 0:  # the progress line goes on from where the checkpoint was
        tracker.add.remote(tokens=restored.state["sequences"] * restored.state["seq_len"])
    log.info("rank %d resumed stage 1 at %d tokens", sums.rank, restored.state["tokens"])
    return restored.keys


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

    if sharded:
        model, rows_only = sharding.load_sharded(cfg.model, device, sum_gradients=True)
    else:
        model, rows_only = load_model(cfg.model).to(device), False
    timeline["model_built"] = time.time()
    model.eval()  # no dropout: the gradient of the deterministic loss at θ0
    sums = _Sums(model, s1.second_moment, device, sharded, checkpointing=s1.checkpoint_every_tokens is not None)
    counted = _resume(sums, tracker)
    loop_s = _stream(sums, s1, tracker, timeline, counted)
    _return_freed_heap()
    totals = sums.reduce(loop_s)
    timeline["reduced"] = time.time()
    if totals.tokens == 0:
        raise UserError(f"general data {config['source']} produced no trainable tokens")
    if sharded or ray.train.get_context().get_world_rank() == 0:
        _keep_result(config, cfg, sums, totals, timeline, rows_only)


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


def _keep_result(config: dict, cfg: Config, sums: _Sums, totals: _Totals, timeline: dict, rows_only: bool) -> None:
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
            "resumed_at_tokens": sums.resumed_at,
            # How each worker got its weights: only its rows from the files, or the whole
            # model first (the builtin model, or weights not in safetensors).
            "weights_read": "own rows" if rows_only else "whole model",
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
    if dataset is not None and s1.checkpoint_every_tokens is not None:
        raise UserError("stage1.checkpoint_every_tokens needs stage1.data (a caller's Dataset has no sequence keys)")
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
    run_name = _run_name(cfg, uri, description)
    trainer = LeanTorchTrainer(
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
            name=run_name,
            **storage.ray_storage(_train_storage(cfg)),
            failure_config=FailureConfig(max_failures=s1.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # each holds everything so far
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
    if s1.checkpoint_every_tokens is not None:  # the artifact is in: its checkpoints are spent
        storage.delete(storage.join(_train_storage(cfg), run_name))
    if made.skipped_records:
        snap = ray.get(tracker.snapshot.remote())
        log.warning("skipped %d malformed records (first: %s)", snap["skipped"], snap["first_skip"])
    elapsed = time.monotonic() - start
    resumed = meta.get("resumed_at_tokens")
    log.info(
        "stage 1 done: %d tokens, %d sequences in %.1fs (%.0f tokens/s), |ĝ_G| = %.4g%s%s",
        made.tokens,
        made.sequences,
        elapsed,
        made.tokens / elapsed,
        made.global_norm,
        f", written to {uri}" if uri else "",
        f" (resumed from a checkpoint at {resumed} tokens)" if resumed else "",
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
        keys=s1.checkpoint_every_tokens is not None,  # the data position checkpoints keep
    )
    budget = None if s1.max_tokens is None else math.ceil(s1.max_tokens / s1.data.seq_len) * s1.data.seq_len
    return dataset, describe_source(s1.data), s1.data.path or s1.data.hf_dataset, budget


def _run_name(cfg: Config, uri: str | None, description: dict) -> str:
    """Ray Train's name for the job. With checkpoints, the same for the same job (model,
    data, settings, output), so that running it again resumes from its last checkpoint;
    the worker layout is left out, as any layout reads any other's checkpoint."""
    if cfg.stage1.checkpoint_every_tokens is None:
        return f"stage1-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    job = {
        "model": model_source(cfg.model),
        "data": description,
        "settings": stage1_settings(cfg.stage1),
        "checkpoint_every_tokens": cfg.stage1.checkpoint_every_tokens,
        "output": uri,
    }
    return f"stage1-{digest(job)}"


def _train_storage(cfg: Config) -> str:
    """Ray Train's run directory: beside the outputs, local or cloud."""
    return storage.join(storage.absolute(cfg.output_dir), "ray_train")
