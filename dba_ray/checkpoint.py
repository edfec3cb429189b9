"""Stage 2 checkpoints: one format for DDP and FSDP, resharded on load.

A checkpoint is ``state.json`` (rank 0: the step, how many shard files) and
``shard-RRRRR-of-NNNNN.safetensors`` files, each holding dim-0 row blocks (as
``torch.chunk`` splits them) of every parameter and AdamW moment, plus that rank's RNG.
Under FSDP every rank writes its own shard; under DDP rank 0 writes the whole model as
the one shard of one. Ray Train merges the ranks' directories into one checkpoint.

On load each rank reads, lazily from whichever files hold them, the rows its own layout
needs: all of them under DDP, its block under FSDP, whatever the number of workers that
wrote the checkpoint. So a run resumes on another worker count, or DDP from FSDP and
back. Safetensors and JSON only.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from dba_ray.dba import local
from dba_ray.errors import UserError
from dba_ray.row_blocks import RowBlocks

STATE = "state.json"


def shard_file(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # A copy of its own: FSDP's local shards are views into padded buffers.
    return local(t).detach().to("cpu", copy=True).contiguous()


def save(path: str, model, optimizer, step: int, extra: dict, rank: int, world: int) -> bool:
    """Write this rank's part into ``path``; True if it wrote one (report ``path``
    then). Under FSDP every rank writes; under DDP only rank 0, the whole model."""
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    index, count = (rank, world) if sharded else (0, 1)
    if not sharded and rank != 0:
        return False
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model::{n}": _cpu(p) for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"optim::{names[id(p)]}::{key}"] = _cpu(torch.as_tensor(value))
    tensors["__torch_rng__"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["__cuda_rng__"] = torch.cuda.get_rng_state()
    save_file(tensors, os.path.join(path, shard_file(index, count)))
    if rank == 0:
        with open(os.path.join(path, STATE), "w") as f:
            json.dump({"step": step, "shards": count, **extra}, f)
    return True


def _rows(param: torch.Tensor) -> tuple[int, int]:
    """The dim-0 rows [start, stop) of ``param`` this rank holds."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 0
    mesh = param.device_mesh
    per = -(-param.shape[0] // mesh.size())  # ceil, as torch.chunk splits
    start = min(mesh.get_local_rank() * per, param.shape[0])
    return start, start + param.to_local().shape[0]


def load(path: str, model, optimizer, rank: int, world: int) -> dict:
    """Restore the model and AdamW state into this rank's layout; returns state.json."""
    try:
        with open(os.path.join(path, STATE)) as f:
            state = json.load(f)
        count = state["shards"]
    except (OSError, KeyError, ValueError):
        raise UserError(
            f"checkpoint {path} is not in this dba-ray's format (an older version?): delete "
            "that run's folder under ray_train to start it again"
        ) from None
    paths = [os.path.join(path, shard_file(i, count)) for i in range(count)]
    shards = RowBlocks(list(enumerate(paths)))
    # A rank's own RNG when the layout is unchanged; else the first shard's.
    with safe_open(paths[rank] if count == world else paths[0], "pt") as own:
        torch.set_rng_state(own.get_tensor("__torch_rng__"))
        if "__cuda_rng__" in own.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state(own.get_tensor("__cuda_rng__"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            local(p).copy_(shards.read(f"model::{name}", *_rows(p)))
    for key in shards.keys():
        if not key.startswith("optim::"):
            continue
        _, name, field = key.split("::")
        p = params[name]
        value = shards.read(key, *_rows(p))
        if value.dim() > 0:  # a moment, sharded like its parameter (the step count is not)
            value = value.to(local(p).device)
            if isinstance(p, DTensor):
                value = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        optimizer.state[p][field] = value
    return state
