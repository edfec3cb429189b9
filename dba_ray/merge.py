"""Merging a fine-tuned model back toward its base, tensor by tensor (plain PyTorch).

One trained model θ_T gives a whole curve of operating points between it and the base
θ0, for the price of evaluation:

- ``linear``: θ_α = θ0 + α·(θ_T − θ0), α in [0, 1]; α = 1 is the trained model, α = 0
  the base (WiSE-FT-style interpolation).
- ``fisher``: per weight, the Fisher-weighted average

      θ_λ = (λ·F_G·θ0 + F_D·θ_T) / (λ·F_G + F_D)

  with F_G the general data's diagonal Fisher at θ0 (v_G, kept by Stage 1) and F_D the
  domain data's at θ_T (the same Stage 1 code path run on the domain data). Each is
  divided by its own mean over all weights, so λ = 1 weighs the two sides alike overall
  whatever the scale of either pass. λ = 0 is the trained model; as λ grows every weight
  the general data cares about returns to θ0, while weights only the domain cares about
  keep their trained values.

Limits. A weight that neither Fisher sees (both zero, e.g. the embedding row of a token
that occurs in neither data set) has no preferred side: a floor of ``EPS`` (relative to
each Fisher's mean of 1) under both makes it fall back to linear interpolation with
α = 1/(1 + λ). The diagonal Fisher ignores how weights interact, and it is measured at
one point each (θ0 and θ_T). Weights are merged in fp32 and cast back to their own
dtype, so a bf16 model gets the merge rounded once to bf16.

Memory: the trained model is loaded once and merged in place; the base weights and the
Fishers are read from memory-mapped safetensors one tensor at a time, so a merge holds
one model plus a few tensors, whatever the number of shards.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from dba_ray.errors import UserError
from dba_ray.row_blocks import RowBlocks

EPS = 1e-6


class SavedTensors(Mapping):
    """Named tensors of the ``*.safetensors`` files in a local directory, read one at a
    time (``prefix`` keeps files whose names start with it, e.g. ``second_moment``). A
    sharded artifact's row blocks (``dba_ray.row_blocks``) are pieced together: sorted
    by name, its files are in rank order."""

    def __init__(self, directory: str, prefix: str = ""):
        self.directory = directory
        paths = sorted(glob.glob(os.path.join(directory, f"{prefix}*.safetensors")))
        self._blocks = RowBlocks(list(enumerate(paths)))
        self._names = set(self._blocks.keys())
        if not self._names:
            raise UserError(f"no {prefix or 'model'} safetensors files in {directory}")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise UserError(f"{self.directory} has no tensor {name!r}")
        return self._blocks.read(name)

    def __iter__(self):
        return iter(self._blocks.keys())

    def __len__(self) -> int:
        return len(self._names)


def mean_value(tensors: Mapping[str, torch.Tensor], names) -> float:
    """Mean over every element of the named tensors (one tensor in memory at a time)."""
    total, count = 0.0, 0
    for name in names:
        t = tensors[name]
        total += float(t.double().sum())
        count += t.numel()
    return total / max(count, 1)


@dataclass
class FisherPair:
    """F_G and F_D for a fisher merge, each with its mean over all weights."""

    general: Mapping[str, torch.Tensor]
    domain: Mapping[str, torch.Tensor]
    general_mean: float
    domain_mean: float

    @classmethod
    def of(cls, general, domain, names) -> "FisherPair":
        names = list(names)
        g, d = mean_value(general, names), mean_value(domain, names)
        if g <= 0 or d <= 0:
            raise UserError("a Fisher for the merge is zero everywhere (no trained tokens?)")
        return cls(general, domain, g, d)

    def weights(self, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        fg = self.general[name].to(device, torch.float32) / self.general_mean + EPS
        fd = self.domain[name].to(device, torch.float32) / self.domain_mean + EPS
        return fg, fd


def merged_tensor(
    theta0: torch.Tensor, theta_t: torch.Tensor, knob: float, fisher: tuple | None = None
) -> torch.Tensor:
    """One merged tensor in fp32: linear with α = ``knob``, or fisher with λ = ``knob``
    when ``fisher`` = (F_G, F_D), both already normalized."""
    theta0, theta_t = theta0.float(), theta_t.float()
    if knob == (1 if fisher is None else 0):
        return theta_t  # the trained model itself, exactly (no rounding through θ0)
    if fisher is None:
        return theta0 + knob * (theta_t - theta0)
    fg, fd = fisher
    wg = knob * fg
    return (wg * theta0 + fd * theta_t) / (wg + fd)


@torch.no_grad()
def merge_into(
    model: torch.nn.Module,
    base: Mapping[str, torch.Tensor],
    knob: float,
    fisher: FisherPair | None = None,
) -> None:
    """Turn the trained ``model`` into the merge at ``knob``, in place, tensor by tensor
    (``base``: θ0 by parameter name, e.g. :class:`SavedTensors` of the base model)."""
    for name, p in model.named_parameters():
        weights = fisher.weights(name, p.device) if fisher is not None else None
        merged = merged_tensor(base[name].to(p.device), p.detach(), knob, weights)
        p.copy_(merged.to(p.dtype))
