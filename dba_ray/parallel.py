"""How Stage 2's workers share the model: DDP or FSDP2 (``train.parallel``), chosen
once per run by :func:`layout`, so that the training loop has no branch on it.

Both answer the same questions: what to do to the model before DBA keeps its
parameters, which rows of ĝ_G a rank reads, what forward and backward run through, when
gradients are synchronized, which rows of an eval set a rank scores, and how rank 0 gets
the whole model to save.
"""

from __future__ import annotations

from contextlib import nullcontext

import ray.train.torch
import torch

from dba_ray import sharding


class DDP:
    """Every rank holds the whole model; DDP averages gradients once per step."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    # The DBA statistics come from already-averaged gradients: nothing to all-reduce.
    stats_all_reduce = None

    def shard(self, model: torch.nn.Module) -> None:
        """Nothing to shard: every rank keeps the whole model."""

    def grad_rows(self, model: torch.nn.Module) -> None:
        return None  # every row of ĝ_G

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp" if self.world > 1 else None)

    def micro_batch(self, forward_model: torch.nn.Module, last: bool):
        """Skip DDP's all-reduce on every micro-batch but the step's last."""
        return forward_model.no_sync() if self.world > 1 and not last else nullcontext()

    def eval_split(self) -> tuple[int, int]:
        return self.rank, self.world  # ranks split each set; the sums are all-reduced

    def after_eval(self, model: torch.nn.Module) -> None:
        pass

    def full_state_dict(self, model: torch.nn.Module) -> None:
        return None  # save_pretrained takes rank 0's own weights


class FSDP:
    """Each rank holds its dim-0 shard of every parameter (dba_ray/sharding.py)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    # Each rank sees only its shards of g_D and ĝ_G: the DBA statistics are summed.
    stats_all_reduce = staticmethod(sharding.all_reduce_sum)

    def shard(self, model: torch.nn.Module) -> None:
        sharding.shard_model(model)

    def grad_rows(self, model: torch.nn.Module) -> dict[str, tuple[int, int]]:
        return sharding.local_rows(model)  # each rank reads only its rows of ĝ_G and v_G

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # fully_shard changed the model in place

    def micro_batch(self, forward_model: torch.nn.Module, last: bool):
        # FSDP reduce-scatters every micro-batch, keeping the summed gradients sharded.
        return nullcontext()

    def eval_split(self) -> tuple[int, int]:
        # Ranks must run the same forward passes (each gathers weights), so every rank
        # scores the whole set.
        return 0, 1

    def after_eval(self, model: torch.nn.Module) -> None:
        # With no backward to follow, the root unit keeps its weights gathered and
        # registered in place of the sharded parameters, which the optimizer, DBA and
        # the checkpoint address.
        model.reshard()

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return sharding.full_state_dict(model)  # a collective: every rank calls it


def layout(parallel: str, rank: int, world: int) -> DDP | FSDP:
    return {"ddp": DDP, "fsdp": FSDP}[parallel](rank, world)
