"""The quality benchmark's rules, as plain functions (no Ray): what is chosen, on what,
and how a method is called ahead of, tied with or behind another.

- Choices read **validation** scores only (``validation.S`` of a run or merge point);
  the test scores are carried along for the tables and never looked at here.
- Seeds: a method's choice is made on seed 0's grid; its reported numbers come from
  seeds 1–3 at that choice, which took no part in it.
- Paired differences: S of the method minus S of the reference, seed by seed (same
  seed, same data order), mean and 95% t-interval over seeds.
- Verdict: **ahead** if the interval lies above zero, **behind** if below, **tie**
  if it contains zero.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% Student-t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Candidate:
    """One option a method can be run with: a training run (its spec and peak lr) and,
    for a merged method, the merge knob."""

    method: str  # the method being chosen for (e.g. "fisher", "mixture", "direct+merge")
    spec: dict  # {name, method, set} of the training run, lr excluded
    lr: float
    knob: float | None  # merge α (None: the trained model itself)
    validation_s: float


def choose(candidates: list[Candidate]) -> Candidate:
    """The candidate with the highest validation S (ties: the smaller lr, then the knob
    nearer the trained model), never looking at test scores."""
    usable = [c for c in candidates if not math.isnan(c.validation_s)]
    if not usable:
        raise ValueError(f"no candidate of {candidates[0].method if candidates else '?'} has a validation score")
    return max(usable, key=lambda c: (c.validation_s, -c.lr, c.knob if c.knob is not None else 2.0))


def edge_lrs(candidates: list[Candidate], lrs: list[float]) -> str | None:
    """'low' / 'high' when the chosen lr is the smallest / largest tried (the optimum is
    not interior, so the grid should extend), else None."""
    lr = choose(candidates).lr
    if lr == min(lrs):
        return "low"
    if lr == max(lrs):
        return "high"
    return None


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        if self.n < 2:
            return "n/a"
        return "ahead" if self.low > 0 else "behind" if self.high < 0 else "tie"

    def text(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def interval(values: list[float]) -> Interval:
    """Mean and 95% t-interval."""
    n = len(values)
    mean = statistics.mean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = T95[n - 1] * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired(method: dict[int, float], reference: dict[int, float]) -> Interval:
    """Seed-by-seed differences method − reference (seeds both have)."""
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        raise ValueError("no seed in common to pair on")
    return interval([method[s] - reference[s] for s in seeds])


@dataclass
class Cost:
    """What one domain costs a method, in trained tokens (forward + backward) and
    evaluated tokens (forward only, for merge curves), plus the one-off Stage 1."""

    run_tokens: int  # one training run
    runs_per_domain: int  # 1, or the number of ratios a mixture searches
    stage1_tokens: int  # shared by every domain (0 if the method does not use ĝ_G)
    eval_tokens: int = 0  # a merge curve's evaluations, per domain


def total_tokens(cost: Cost, domains: int, length: float = 1.0) -> int:
    """Trained tokens for ``domains`` domains at ``length`` × the benchmark's run length
    (Stage 1 is paid once and does not grow with the domain runs)."""
    return round(cost.stage1_tokens + domains * cost.runs_per_domain * cost.run_tokens * length)
