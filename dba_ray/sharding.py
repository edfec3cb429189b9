"""FSDP2 for Stage 2 (``train.parallel: fsdp``): each rank holds only its dim-0 shard
of every parameter, gradient, AdamW moment, ĝ_G, v_G and θ0; and for Stage 1
(``stage1.parallel: fsdp``), of the weights and the ĝ_G / v_G sums.

``fully_shard`` turns each parameter into a DTensor sharded on dim 0 (rows split as
``torch.chunk`` does); the DBA update then works on the local shards, and only its
scalars (⟨g_D, ĝ_G⟩, ‖g_D‖², and ‖ĝ_G‖² once) cross ranks, through ``all_reduce_sum``.
Checkpoints are written by ``dba_ray.checkpoint``, the same format as DDP's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from dba_ray.config import ModelConfig
from dba_ray.model import load_empty_model, load_model, weight_files
from dba_ray.row_blocks import RowBlocks


def shard_model(model: torch.nn.Module, sum_gradients: bool = False) -> torch.nn.Module:
    """Shard ``model`` in place: one FSDP unit per transformer block (the classes a
    Hugging Face model lists in ``_no_split_modules``), the rest in the root unit, so
    only one block's full weights exist at a time in forward and backward.
    ``sum_gradients``: each reduce-scatter sums the ranks' gradients instead of
    averaging them (Stage 1 keeps sums, as a token-weighted mean needs)."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    for module in units:
        fully_shard(module)
    fully_shard(model)
    if sum_gradients:
        for unit in [*units, model]:
            # Factor 1 alone asks for a pre-multiplied sum, which Gloo lacks; forcing a
            # plain SUM with no division gives the exact sum on every backend.
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


def load_sharded(cfg: ModelConfig, device: torch.device, sum_gradients: bool = False) -> tuple[torch.nn.Module, bool]:
    """The model sharded as ``shard_model`` does, on ``device``; and whether each rank
    read only its own rows of the weights (see ``_row_source``): the model is built on
    the meta device, sharded, then each rank reads its rows from the files, so no rank
    ever holds the whole model (at 70B, 140 GB in bf16 per worker). Otherwise the whole
    model is loaded first and then sharded (a transient full copy)."""
    model = load_empty_model(cfg).to(getattr(torch, cfg.dtype))
    source = _row_source(cfg, model)
    if source is None:
        return shard_model(load_model(cfg).to(device), sum_gradients), False
    shard_model(model, sum_gradients)
    model.to_empty(device=device)
    for module in _rotary(model):  # non-persistent buffers: computed from the config, not read
        model._init_weights(module)
    rows = local_rows(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            mine = param.to_local() if isinstance(param, DTensor) else param
            mine.copy_(source.read(name, *rows.get(name, (0, None))))
    return model, True


def reads_own_rows(cfg: ModelConfig) -> bool:
    """Whether ``load_sharded`` reads only each rank's rows of this model."""
    return _row_source(cfg, load_empty_model(cfg)) is not None


def _rotary(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if "RotaryEmbedding" in type(m).__name__ and hasattr(m, "original_inv_freq")]


def _row_source(cfg: ModelConfig, model: torch.nn.Module) -> RowBlocks | None:
    """The model's safetensors files, to read row ranges of every parameter from; None
    unless every parameter is in them and the only buffers are rotary frequencies
    (Llama, Qwen2, Mistral and kin), which transformers recomputes from the config."""
    files = weight_files(cfg)
    rebuilt = {id(b) for m in _rotary(model) for b in m.buffers()}
    if not files or not all(id(b) in rebuilt for b in model.buffers()):
        return None
    source = RowBlocks(list(enumerate(files)))
    return source if set(dict(model.named_parameters())) <= set(source.keys()) else None


def local_rows(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """For each FSDP2-sharded parameter, the dim-0 rows ``(start, stop)`` this rank
    holds (rows split as ``torch.chunk`` does), so that it reads only those of ĝ_G and
    v_G (``artifact.load(rows=...)``)."""
    rows = {}
    for name, param in model.named_parameters():
        if not isinstance(param, DTensor):
            continue
        if tuple(param.placements) != (Shard(0),):
            raise ValueError(f"expected a 1-D mesh sharded on dim 0, got {param.placements}")
        mesh = param.device_mesh
        per_rank = -(-param.shape[0] // mesh.size())  # ceil, as torch.chunk splits
        start = min(mesh.get_local_rank() * per_rank, param.shape[0])
        rows[name] = (start, start + param.to_local().shape[0])
    return rows


def all_reduce_sum(values: torch.Tensor) -> None:
    """The DBA statistics hook: sum across ranks, in place."""
    dist.all_reduce(values)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on rank 0's CPU (empty elsewhere). A collective: every rank calls
    it. Gathered tensor by tensor, so no rank holds more than one whole tensor on the
    accelerator at a time."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
