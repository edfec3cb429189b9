"""FSDP2 for Stage 2 (``train.parallel: fsdp``): each rank holds only its dim-0 shard
of every parameter, gradient, AdamW moment, ĝ_G, v_G and θ0.

``fully_shard`` turns each parameter into a DTensor sharded on dim 0 (rows split as
``torch.chunk`` does); the DBA update then works on the local shards, and only its
scalars (⟨g_D, ĝ_G⟩, ‖g_D‖², and ‖ĝ_G‖² once) cross ranks, through ``all_reduce_sum``.
Checkpoints are one safetensors file per rank plus rank 0's state.json, merged by Ray
Train into one checkpoint directory; they resume on the same number of workers only.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from dba_ray.dba import local
from dba_ray.errors import UserError


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place: one FSDP unit per transformer block (the classes a
    Hugging Face model lists in ``_no_split_modules``), the rest in the root unit, so
    only one block's full weights exist at a time in forward and backward."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def local_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of ``full``, a whole tensor shaped like ``param``, as FSDP2
    sharded ``param``; a copy, so the whole tensor can be freed."""
    if not isinstance(param, DTensor):
        return full
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"expected a 1-D mesh sharded on dim 0, got {param.placements}")
    mesh = param.device_mesh
    rows = -(-param.shape[0] // mesh.size())  # ceil, as torch.chunk splits
    start = mesh.get_local_rank() * rows
    shard = full.reshape(param.shape)[start : start + rows]
    if shard.shape != param.to_local().shape:
        raise ValueError(f"shard of shape {tuple(shard.shape)} does not match {tuple(param.to_local().shape)}")
    return shard.clone()


def local_shards(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None):
    """The local shards of whole tensors named like ``model``'s parameters (ĝ_G, v_G).
    Consumes ``tensors`` so each whole tensor is freed once its shard is taken."""
    if tensors is None:
        return None
    return {n: local_shard(tensors.pop(n), p) for n, p in model.named_parameters() if n in tensors}


def all_reduce_sum(values: torch.Tensor) -> None:
    """The DBA statistics hook: sum across ranks, in place."""
    dist.all_reduce(values)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on rank 0's CPU (empty elsewhere). A collective: every rank calls
    it. Gathered tensor by tensor, so no rank holds more than one whole tensor on the
    accelerator at a time."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------- checkpoints


def shard_file(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # A copy of its own: local shards are views into FSDP's padded buffers.
    return local(t).detach().to("cpu", copy=True).contiguous()


def save_checkpoint(path: str, model, optimizer, step: int, extra: dict, rank: int, world: int) -> None:
    """This rank's shards of the model and AdamW state (and its RNG) into one file;
    rank 0 adds state.json. Every rank reports ``path``; Ray Train merges them."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model::{n}": _cpu(p) for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim::{names[id(p)]}::{key}"] = _cpu(torch.as_tensor(value))
    tensors["__torch_rng__"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["__cuda_rng__"] = torch.cuda.get_rng_state()
    save_file(tensors, os.path.join(path, shard_file(rank, world)))
    if rank == 0:
        with open(os.path.join(path, "state.json"), "w") as f:
            json.dump({"step": step, "parallel": "fsdp", "world_size": world, **extra}, f)


def load_checkpoint(path: str, model, optimizer, rank: int, world: int) -> dict:
    """Restore this rank's shards; refuse a checkpoint sharded for another world size."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    saved = state.get("world_size")
    if state.get("parallel") != "fsdp" or saved != world:
        raise UserError(
            f"checkpoint {path} holds {saved or 'no'} FSDP shards but this run has {world} "
            f"workers: resume a sharded checkpoint with train.num_workers={saved or '?'} "
            "and train.parallel: fsdp"
        )
    tensors = load_file(os.path.join(path, shard_file(rank, world)))
    torch.set_rng_state(tensors.pop("__torch_rng__"))
    cuda_rng = tensors.pop("__cuda_rng__", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            local(p).copy_(tensors.pop(f"model::{name}"))
    for key, value in tensors.items():
        _, name, field = key.split("::")
        p = params[name]
        if value.dim() > 0:  # a moment: sharded like its parameter
            value = value.to(local(p).device)
            if isinstance(p, DTensor):
                value = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        optimizer.state[p][field] = value
    return state
