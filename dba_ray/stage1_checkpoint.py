"""Stage 1 checkpoints (``stage1.checkpoint_every_tokens``): the running sums, the
counts and the data position, so that an interrupted Stage 1 continues instead of
starting over.

A checkpoint is one ``stage1-RRRRR-of-NNNNN.safetensors`` per rank and ``state.json``
(rank 0, the global counts). Each file holds ``keys``, the int64 keys of the sequences
that rank counted (``data.tokenize.sequence_keys``; rank 0's also those of the
checkpoint it resumed from), and the sums it holds, in the row-block format of
``dba_ray.row_blocks``: under fsdp its rows of ``grad::NAME`` (and ``sq::NAME``, v_G's),
already summed over ranks; under ddp rank 0's whole tensors, the others' sums having
been reduced onto it. Any layout reads any other's, as Stage 2 checkpoints do. Ray
Train merges the ranks' folders into one checkpoint.

The data position is a set of keys, not an offset: Ray Data hands blocks to whichever
worker asks first, so what the workers have counted is no prefix of the stream. A
resumed job reads the data again and skips those keys before the forward pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save_file

from dba_ray.row_blocks import RowBlocks

STATE = "state.json"


def file_name(rank: int, world: int) -> str:
    return f"stage1-{rank:05d}-of-{world:05d}.safetensors"


def write(directory: str, rank: int, world: int, tensors: dict, keys: np.ndarray, state: dict | None) -> None:
    """This rank's file in ``directory`` (and state.json from rank 0)."""
    # Copies of their own: FSDP's local gradient rows can be views of one shared buffer,
    # which safetensors refuses.
    out = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    out["keys"] = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64))
    save_file(out, os.path.join(directory, file_name(rank, world)))
    if state is not None:
        with open(os.path.join(directory, STATE), "w") as f:
            json.dump(dict(state, world=world), f)


@dataclass
class Restored:
    state: dict  # the global counts at the checkpoint
    keys: np.ndarray  # sorted: the sequences already counted
    blocks: RowBlocks  # the sums' rows, "grad::NAME" and "sq::NAME"


def read(directory: str) -> Restored:
    with open(os.path.join(directory, STATE)) as f:
        state = json.load(f)
    world = state["world"]
    blocks = RowBlocks([(r, os.path.join(directory, file_name(r, world))) for r in range(world)])
    return Restored(state=state, keys=np.sort(blocks.read("keys").numpy()), blocks=blocks)


def unseen(batches: Iterator[dict], counted: np.ndarray, batch_size: int) -> Iterator[dict]:
    """``batches`` without the sequences whose key is in ``counted`` (sorted), cut again
    into micro-batches of ``batch_size`` rows: the ones an uninterrupted pass would have
    had next (exactly those when one worker reads the stream in order)."""
    pending: list[dict] = []
    held = 0
    for batch in batches:
        keep = ~np.isin(batch["key"], counted, assume_unique=False)
        if not keep.all():
            batch = {k: v[keep] for k, v in batch.items()}
        if len(batch["key"]):
            pending.append(batch)
            held += len(batch["key"])
        while held >= batch_size:
            joined = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in joined.items()}
            rest = {k: v[batch_size:] for k, v in joined.items()}
            held -= batch_size
            pending = [rest] if held else []
    if held:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
