"""Stage 1's sums on several workers, with the grouping of micro-batches known: real
torch.distributed (Gloo) processes run ``_Sums`` as Stage 1's workers do, each fed its
own micro-batches (uneven: one worker runs out first, one may have none), under ddp
and fsdp. ĝ_G and v_G must equal one process over the same global micro-batches (the
k-th micro-batch of every worker), so the two layouts compute one quantity; and so
must a run checkpointed after its first step and restored into fresh workers."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks
from safetensors.torch import load_file, save_file

from dba_ray import sharding, stage1_checkpoint
from dba_ray.config import ModelConfig
from dba_ray.data.tokenize import IGNORE
from dba_ray.global_gradient import _Sums
from dba_ray.model import load_model

SEQ = 12


def _batches(world: int) -> list[list[dict]]:
    """Each worker's micro-batches: 2, 1 and 0 of them (3 workers) or 3 and 2, the last
    one short, some labels ignored, so micro-batches differ in trained tokens."""
    counts = {2: [3, 2], 3: [2, 1, 0]}[world]
    gen = np.random.default_rng(0)
    out = []
    for r, n in enumerate(counts):
        mine = []
        for k in range(n):
            rows = 2 if (r, k) == (len(counts) - 1, n - 1) else 3
            ids = gen.integers(6, 200, size=(rows, SEQ)).astype(np.int32)
            labels = ids.copy()
            labels[:, : int(gen.integers(1, 5))] = IGNORE
            keys = np.arange(rows, dtype=np.int64) + 100 * r + 10 * k
            mine.append({"input_ids": ids, "labels": labels, "key": keys})
        out.append(mine)
    return out


def _new_sums(mode: str, second_moment: bool, checkpointing: bool) -> _Sums:
    """A worker's start: the base model (sharded under fsdp) and empty sums."""
    model = load_model(ModelConfig())
    model.eval()
    if mode == "fsdp":
        sharding.shard_model(model, sum_gradients=True)
    return _Sums(model, second_moment, torch.device("cpu"), sharded=mode == "fsdp", checkpointing=checkpointing)


def _worker(rank: int, world: int, port: int, mode: str, second_moment: bool, resume: bool, out: str) -> None:
    """Stage 1's loop on this rank's micro-batches; with ``resume``, a checkpoint after
    the first step, then fresh sums on a fresh model restored from it go on."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mine = _batches(world)[rank]
    sums = _new_sums(mode, second_moment, resume)
    if resume:
        assert sums.add(mine[0] if mine else None)
        tensors, keys, counts = sums.snapshot(0.0)
        os.makedirs(f"{out}/ckpt", exist_ok=True)
        stage1_checkpoint.write(f"{out}/ckpt", rank, world, tensors, keys, counts if rank == 0 else None)
        dist.barrier()
        sums = _new_sums(mode, second_moment, resume)
        restored = stage1_checkpoint.read(f"{out}/ckpt")
        assert restored.keys.tolist() == sorted(k for b in _batches(world) if b for k in b[0]["key"].tolist())
        sums.restore(restored)
        mine = mine[1:]
    for batch in mine:
        assert sums.add(batch)
    while sums.add(None):  # run empty steps until every worker is done
        pass
    totals = sums.reduce(0.0)
    tensors = {f"g::{n}": t.contiguous() for n, t in sums.grads.items()}
    tensors.update({f"sq::{n}": t.contiguous() for n, t in (sums.sq or {}).items()})
    save_file(tensors, f"{out}/rank{rank}.safetensors")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"tokens": totals.tokens, "global_batches": totals.global_batches, "steps": sums.steps}, f)
    dist.destroy_process_group()


def _reference(world: int) -> tuple[dict, dict, int, int]:
    """One process: ĝ_G over every sequence, v_G over the global micro-batches."""
    model = load_model(ModelConfig())
    model.eval()
    per_rank = _batches(world)
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    sq = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    tokens = steps = 0
    for k in range(max(len(b) for b in per_rank)):
        step = [b[k] for b in per_rank if k < len(b)]
        ids = torch.from_numpy(np.concatenate([b["input_ids"] for b in step])).long()
        labels = torch.from_numpy(np.concatenate([b["labels"] for b in step])).long()
        n = int((labels[:, 1:] != IGNORE).sum())
        model.zero_grad()
        (model(input_ids=ids, labels=labels).loss * n).backward()  # the step's summed gradient
        for name, p in model.named_parameters():
            grads[name] += p.grad
            sq[name] += (p.grad / n) ** 2
        tokens, steps = tokens + n, steps + 1
    return {n: g / tokens for n, g in grads.items()}, {n: s / steps for n, s in sq.items()}, tokens, steps


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b)
    return (num / sum(float(b[k].double().pow(2).sum()) for k in b)) ** 0.5


def _run(tmp_path, mode: str, world: int, second_moment: bool, resume: bool) -> tuple[dict, dict]:
    """Spawn the workers; what they wrote, joined: ĝ_G and (if kept) v_G."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_ranks(_worker, (world, port, mode, second_moment, resume, str(tmp_path)), world)
    ref_mean, ref_sq, ref_tokens, ref_steps = _reference(world)

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(f == {"tokens": ref_tokens, "global_batches": ref_steps, "steps": ref_steps} for f in facts)
    if mode == "fsdp":  # each rank holds its rows; together they are the whole tensor
        whole = {k: torch.cat([r[k] for r in ranks]) for k in ranks[0]}
        rows = {n: [r[f"g::{n}"].shape[0] for r in ranks] for n in ref_mean}
        assert all(sum(v) == ref_mean[n].shape[0] and max(v) < ref_mean[n].shape[0] for n, v in rows.items())
    else:  # every rank holds the same global sums
        whole = ranks[0]
        assert all(torch.equal(r[k], whole[k]) for r in ranks for k in whole)
    mean = {n: whole[f"g::{n}"] / ref_tokens for n in ref_mean}
    second = {n: whole[f"sq::{n}"] / ref_steps for n in ref_sq} if second_moment else None
    return (mean, ref_mean), (second, ref_sq)


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("fsdp", 2), ("ddp", 3), ("fsdp", 3)])
def test_both_layouts_give_one_process_mean_and_second_moment(tmp_path, mode, world):
    (mean, ref_mean), (second, ref_sq) = _run(tmp_path, mode, world, second_moment=True, resume=False)
    assert _rel(mean, ref_mean) < 1e-6
    assert _rel(second, ref_sq) < 1e-5


# ddp without v_G: the checkpoint reduces the sums onto rank 0; fsdp without v_G: the
# sums are FSDP's own gradients, restored into fresh ones; fsdp with v_G: both buffers.
@pytest.mark.parametrize("mode,world,second_moment", [("ddp", 3, False), ("fsdp", 3, False), ("fsdp", 2, True)])
def test_a_checkpointed_and_restored_run_equals_one_process(tmp_path, mode, world, second_moment):
    (mean, ref_mean), (second, ref_sq) = _run(tmp_path, mode, world, second_moment, resume=True)
    assert _rel(mean, ref_mean) < 1e-6
    if second_moment:
        assert _rel(second, ref_sq) < 1e-5
