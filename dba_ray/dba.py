"""The DBA update, in plain PyTorch: usable in Ray Train, a Hugging Face Trainer, or a
bare loop. No Ray here.

Per optimizer step t of T (after backward, DDP averaging and gradient clipping, before
``optimizer.step()``), with g_D the domain gradient in each parameter's ``.grad``:

1. anchor (optional): g_D += λ·(v_G / mean(v_G))⊙(θ − θ0)
2. pcgrad (DC mode): if ⟨g_D, ĝ_G⟩ < 0, g_D −= ⟨g_D, ĝ_G⟩/‖ĝ_G‖²·ĝ_G
3. GGB: γ_t = min(γ_max, boost/T·(1 − t/T)); ``.grad`` becomes g_B = γ_t·ĝ_G + (1−γ_t)·g_D
4. DC: the step's learning rate is multiplied by c_t (Adam cancels gradient scale, so
   scaling the gradient would do nothing): see ``correction``.
5. AL: the learning rate itself follows ``lr_at``.

``boost_mode`` changes where ĝ_G enters (the paper's is ``gradient``, step 3): with
``masked`` step 3 uses ĝ_G clipped per weight to ±|g_D|; with ``update`` the optimizer
sees g_D and ``after_step`` then moves each weight by −γ_t·lr_t·ĝ_G/√v_G. Under AdamW
the paper's form hands ĝ_G a full lr-sized step on every weight the domain data does
not move (AdamW divides by the domain gradient's second moment there); both variants
bound what ĝ_G alone can do to a weight.

Everything is computed from three scalars (⟨g_D, ĝ_G⟩, ‖g_D‖², ‖ĝ_G‖²); ‖g_B‖ follows
from them. A step is one loop over the tensors: for each, the anchor, both dot products
and the in-place blend, back to back while the tensor is in cache, so g_D and ĝ_G are
read from memory about once (``benchmarks/dba_overhead.py`` measures the cost). Under sharded training pass ``all_reduce`` to sum those scalars; with
FSDP2 (DTensor parameters) pass each rank's shard of ĝ_G and v_G, and every tensor op
here runs on the local shards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from dba_ray.config import DBAConfig, ScheduleConfig


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage under no_grad); a tensor unchanged."""
    return t.to_local() if isinstance(t, DTensor) else t


def gamma_at(t: int, total: int, boost: float, gamma_max: float) -> float:
    """GGB weight of step t (0-based) of ``total``: min(γ_max, k0·(1 − t/T)), k0 = boost/T."""
    return min(gamma_max, boost / total * (1.0 - t / total))


def lr_at(t: int, total: int, cfg: ScheduleConfig) -> float:
    """Learning rate of step t (0-based) of ``total``. With ``anneal`` off: constant."""
    peak = cfg.lr
    if not cfg.anneal:
        return peak
    floor = cfg.min_lr_ratio * peak
    warmup = round(cfg.warmup_ratio * total)
    if t < warmup:
        return peak * (t + 1) / warmup
    if cfg.shape == "wsd":
        decay = max(1, round(cfg.decay_ratio * total))
        start = max(warmup, total - decay)
        if t < start:
            return peak
        # Every step of the window decays, the last one reaches the floor: counting
        # from 0 would keep the window's first step at the peak (a one-step window
        # would never decay) and drop the rest in a cliff.
        p = (t - start + 1) / (total - start)
        return peak - (peak - floor) * min(p, 1.0)
    p = min((t - warmup) / max(total - warmup - 1, 1), 1.0)
    if cfg.shape == "linear":
        return peak - (peak - floor) * p
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def correction(
    mode: str,
    gamma: float,
    norm_g: float,
    norm_d: float,
    norm_b: float,
    cos: float | None,
    kappa: float,
    c_max: float,
) -> float:
    """c_t, the learning-rate multiplier of dynamic correction, clipped to [1, c_max].
    ``cos`` is None when undefined (g_D or ĝ_G is zero): no correction then, since
    there is no disagreement to correct (an all-masked batch has g_D = 0, and reading
    its cos as 0 would give it a larger step than a batch that agrees with ĝ_G)."""
    if mode == "norm":
        if norm_b == 0.0:
            return 1.0
        c = (gamma * norm_g + (1.0 - gamma) * norm_d) / norm_b
    elif mode == "cosine":
        if cos is None:
            return 1.0
        c = 1.0 + kappa * (1.0 - cos) / 2.0
    else:
        return 1.0
    return min(max(c, 1.0), c_max)


@dataclass
class StepStats:
    """What one DBA step did; logged every step."""

    gamma: float
    cos: float  # cos(g_D, ĝ_G), before any pcgrad projection; 0 when either is zero
    c: float
    norm_d: float  # ‖g_D‖ (after anchor and projection)
    norm_b: float  # ‖g_B‖
    projected: bool  # pcgrad removed a conflicting component

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


class DBA:
    """Turns the domain gradient in ``.grad`` into DBA's boosted gradient.

    ``params``: (name, parameter) pairs, as ``model.named_parameters()`` gives.
    ``global_grad``: ĝ_G by the same names (an artifact's ``mean``), on any device.
    ``second_moment``: v_G by name, needed for ``anchor: fisher``.
    ``all_reduce``: sums a 1-D tensor across ranks in place (sharded training only).
    """

    def __init__(
        self,
        params: Iterable[tuple[str, torch.nn.Parameter]],
        global_grad: dict[str, torch.Tensor],
        total_steps: int,
        cfg: DBAConfig,
        *,
        second_moment: dict[str, torch.Tensor] | None = None,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
    ):
        if total_steps < 1:
            raise ValueError("total_steps must be >= 1")
        self.cfg, self.total, self.all_reduce = cfg, total_steps, all_reduce
        self.gamma = 0.0  # γ_t of the last ``apply``
        self.params = [(n, p) for n, p in params if p.requires_grad]
        missing = [n for n, _ in self.params if n not in global_grad]
        if missing:
            raise ValueError(f"global gradient lacks {len(missing)} parameters, e.g. {missing[0]}")
        dtype = getattr(torch, cfg.grad_dtype)
        self.g = [global_grad[n].to(p.device, dtype).view_as(local(p)) for n, p in self.params]
        sq_norm_g = torch.stack([h.float().pow(2).sum() for h in self.g]).sum().reshape(1)
        self.norm_g = math.sqrt(self._reduce(sq_norm_g)[0])
        self.anchor = None
        needs_v = cfg.anchor == "fisher" or (cfg.ggb and cfg.boost_mode == "update")
        if needs_v and second_moment is None:
            raise ValueError("anchor: fisher and boost_mode: update need the second moment v_G (stage1.second_moment)")
        # boost_mode update: the per-weight step direction ĝ_G/√v_G, |·| <= 1 since v_G >= ĝ_G².
        self.update_dir = None
        if cfg.ggb and cfg.boost_mode == "update":
            self.update_dir = []
            for h, (n, p) in zip(self.g, self.params):
                v = second_moment[n].to(p.device, torch.float32).view_as(local(p))
                root = v.sqrt()
                step = torch.where(root > 0, h.float() / root, torch.zeros_like(root))
                # |ĝ_G| <= √v_G only roughly (token- vs batch-weighted means, SVD, bf16): enforce it.
                self.update_dir.append(step.clamp_(-1.0, 1.0).to(dtype))
        if cfg.anchor == "fisher":
            v = [second_moment[n].to(p.device, torch.float32).view_as(local(p)) for n, p in self.params]
            total = self._reduce(
                torch.stack([x.sum() for x in v] + [torch.tensor(float(sum(x.numel() for x in v)), device=v[0].device)])
            )
            mean_v = sum(total[:-1]) / total[-1]
            # Anchor weights and base weights θ0, both fixed for the run.
            self.anchor = [
                (x / mean_v if mean_v > 0 else torch.zeros_like(x), local(p).detach().clone())
                for x, (_, p) in zip(v, self.params)
            ]

    def _reduce(self, values: torch.Tensor) -> list[float]:
        values = values.to(torch.float64)
        if self.all_reduce is not None:
            self.all_reduce(values)
        return values.tolist()

    @torch.no_grad()
    def apply(self, step: int) -> StepStats:
        """Replace each ``.grad`` (g_D) by g_B for step ``step`` (0-based); return the
        stats, whose ``c`` multiplies this step's learning rate."""
        cfg = self.cfg
        gamma = gamma_at(step, self.total, cfg.boost, cfg.gamma_max) if cfg.ggb else 0.0
        self.gamma = gamma
        # The paper's blend does not depend on the dot products, so it is done in the
        # same pass over each tensor as they are: g_D and ĝ_G are read from memory once
        # while the tensor is in cache (pcgrad must project first, masked clips first).
        blend_now = gamma > 0 and cfg.boost_mode == "gradient" and cfg.dc != "pcgrad"
        anchors = self.anchor or [None] * len(self.params)
        grads, dots, squares = [], [], []
        for (_, p), h, anchor in zip(self.params, self.g, anchors):
            if p.grad is None:  # unused in this step's graph: its g_D is zero
                p.grad = torch.zeros_like(p)
            g = local(p.grad)
            grads.append(g)
            if anchor is not None:
                w, theta0 = anchor
                g.addcmul_(w, local(p) - theta0, value=cfg.fisher_lambda)
            # Statistics in fp32 (a bf16 ĝ_G or g_D is widened one tensor at a time).
            g32, h32 = g.float().reshape(-1), h.float().reshape(-1)
            dots.append(torch.dot(g32, h32))
            squares.append(torch.dot(g32, g32))
            if blend_now:
                g.lerp_(h32.view_as(g) if g.dtype == torch.float32 else h.to(g.dtype), gamma)
        dot, nd2 = self._reduce(torch.stack([torch.stack(dots).sum(), torch.stack(squares).sum()]))
        ng2 = self.norm_g**2
        defined = nd2 > 0 and ng2 > 0
        cos = dot / math.sqrt(nd2 * ng2) if defined else 0.0
        projected = False
        if cfg.dc == "pcgrad" and dot < 0 and ng2 > 0:
            coef = dot / ng2
            for g, h in zip(grads, self.g):
                g.add_(h, alpha=-coef)
            nd2, dot, projected = max(nd2 - dot * dot / ng2, 0.0), 0.0, True
        if gamma > 0 and cfg.boost_mode == "masked":
            for g, h in zip(grads, self.g):
                bound = g.abs()
                g.mul_(1.0 - gamma).add_(torch.clamp(h.to(g.dtype), -bound, bound), alpha=gamma)
            nb2 = self._reduce(torch.stack(torch._foreach_norm(grads)).float().pow(2).sum().reshape(1))[0]
        else:
            if gamma > 0 and cfg.boost_mode == "gradient" and not blend_now:  # after pcgrad
                for g, h in zip(grads, self.g):
                    g.lerp_(h.to(g.dtype), gamma)
            # update mode: the g_B the paper's form would blend, so that DC corrects the
            # step exactly as there and only where ĝ_G enters differs.
            nb2 = gamma**2 * ng2 + (1 - gamma) ** 2 * nd2 + 2 * gamma * (1 - gamma) * dot
        norm_d, norm_b = math.sqrt(nd2), math.sqrt(max(nb2, 0.0))
        c = correction(cfg.dc, gamma, self.norm_g, norm_d, norm_b, cos if defined else None, cfg.kappa, cfg.c_max)
        return StepStats(gamma=gamma, cos=cos, c=c, norm_d=norm_d, norm_b=norm_b, projected=projected)

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """After the optimizer's step (``lr``: the step's learning rate, c_t included):
        ``boost_mode: update`` moves each weight by −γ_t·lr·clip(ĝ_G/√v_G, ±1); else nothing."""
        if self.update_dir is None or self.gamma == 0:
            return
        params = [local(p) for _, p in self.params]
        if all(p.dtype == d.dtype for p, d in zip(params, self.update_dir)):
            torch._foreach_add_(params, self.update_dir, alpha=-self.gamma * lr)
        else:
            for p, d in zip(params, self.update_dir):
                p.add_(d.to(p.dtype), alpha=-self.gamma * lr)


class DBAOptimizer(torch.optim.Optimizer):
    """Wraps any optimizer so that each ``step()`` applies DBA first and scales the
    learning rate by c_t for that step only. Drop-in for a bare loop or a Hugging Face
    ``Trainer(optimizers=(DBAOptimizer(...), scheduler))``; the scheduler (AL) drives
    the base learning rate as usual, e.g. ``schedule_lambda``."""

    def __init__(self, optimizer: torch.optim.Optimizer, dba: DBA, start_step: int = 0):
        # Share the inner optimizer's state instead of calling Optimizer.__init__:
        # schedulers, Accelerate and checkpoints then see one set of param groups.
        self.optimizer, self.dba, self.t = optimizer, dba, start_step
        self.last_stats: StepStats | None = None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "dba_step": self.t}

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.t = int(state_dict["dba_step"])

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stats = self.dba.apply(self.t)
        base = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * stats.c
        try:
            self.optimizer.step()
            self.dba.after_step(self.param_groups[0]["lr"])
        finally:
            for g, lr in zip(self.param_groups, base):
                g["lr"] = lr
        self.t += 1
        self.last_stats = stats
        return loss


def schedule_lambda(total_steps: int, cfg: ScheduleConfig) -> Callable[[int], float]:
    """For ``torch.optim.lr_scheduler.LambdaLR`` with the optimizer's lr set to cfg.lr."""
    return lambda t: lr_at(min(t, total_steps - 1), total_steps, cfg) / cfg.lr
