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

The third protocol (PROTOCOL3.md §3–§4) adds to these: ties in a choice go to the smaller
lr, then the smaller λ or r (``Candidate.option``), then the knob nearer the trained
model; intervals come from a paired hierarchical bootstrap over test records and seeds
(``bootstrap_paired``), and a verdict needs a mean of at least δ_S (``Bootstrap``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

# Two-sided 95% Student-t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Candidate:
    """One option a method can be run with: a training run (its spec and peak lr) and,
    for a merged method, the merge knob."""

    method: str  # the method being chosen for (e.g. "fisher", "mixture", "direct+merge")
    spec: dict  # {name, method, set} of the training run, lr excluded
    lr: float
    knob: float | None  # merge α or λ_m (None: the trained model itself)
    validation_s: float
    option: float | None = None  # the run's fisher λ or mixture r (None: a method without one)
    trained_knob: float = 1.0  # the knob value that is the trained model itself: α 1, λ_m 0

    @property
    def distance(self) -> float:
        """How far the merge knob is from the trained model (0: the trained model)."""
        return 0.0 if self.knob is None else abs(self.knob - self.trained_knob)


def choose(candidates: list[Candidate]) -> Candidate:
    """The candidate with the highest validation S (ties: the smaller lr, then the
    smaller λ or r, then the knob nearer the trained model), never looking at test scores."""
    usable = [c for c in candidates if not math.isnan(c.validation_s)]
    if not usable:
        raise ValueError(f"no candidate of {candidates[0].method if candidates else '?'} has a validation score")
    return max(usable, key=lambda c: (c.validation_s, -c.lr, -(c.option or 0.0), -c.distance))


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


# δ_S: the smallest difference in S a verdict may rest on (PROTOCOL3 §1, §4).
DELTA_S = 0.001
REPLICATES = 10_000

# One run's test sets, scored per record: set name -> array [records, 3] of each
# record's (NLL sum, correct tokens, tokens), in the set's order.
RecordSums = dict[str, np.ndarray]


@dataclass
class Bootstrap(Interval):
    """A paired bootstrap interval (``n``: the seeds), with the third protocol's verdict."""

    @property
    def verdict(self) -> str:
        """ahead / behind: the interval excludes 0 and |mean| ≥ δ_S; "tie (< δ)": it
        excludes 0 with a smaller mean; tie: it holds 0."""
        if self.low > 0 or self.high < 0:
            if abs(self.mean) < DELTA_S:
                return "tie (< δ)"
            return "ahead" if self.low > 0 else "behind"
        return "tie"


def _scores(sums: RecordSums, draws: dict[str, np.ndarray | slice], domain: list[str], general: list[str]):
    """S_D, S_G and S of one run from its records picked by ``draws`` (per set: the
    records' indices, one row per replicate, or a slice for the full set)."""

    def accuracy(name: str) -> np.ndarray:
        picked = sums[name][draws[name]]
        return picked[..., 1].sum(axis=-1) / picked[..., 2].sum(axis=-1)

    s_d = np.mean([accuracy(n) for n in domain], axis=0)
    s_g = np.mean([accuracy(n) for n in general], axis=0)
    return {"S_D": s_d, "S_G": s_g, "S": 2 * s_d * s_g / (s_d + s_g)}


def bootstrap_paired(
    method: dict[int, RecordSums],
    reference: dict[int, RecordSums],
    domain: list[str],
    general: list[str],
    replicates: int = REPLICATES,
    seed: int = 0,
) -> dict[str, Bootstrap]:
    """ΔS, ΔS_D and ΔS_G of ``method`` over ``reference`` (each: seed -> its test
    sets' RecordSums), paired by seed, with 95% percentile intervals (PROTOCOL3 §4).

    One replicate: in every set, draw its records with replacement, the same draw for
    both runs and every seed; per seed s, d_s = score(method, s) − score(reference, s);
    then, with m the mean of the d_s, draw n seeds with replacement:
    Δ* = m + √(n/(n−1))·(mean of the drawn d_s − m), which undoes the (n−1)/n by which
    resampling n values shrinks their variance. The point estimate is the mean of the d_s
    on the full sets. Draw order, from ``numpy.random.default_rng(seed)``: every set of
    the runs in sorted name order (replicates × its records), then the seeds
    (replicates × n), so ΔS with S_G over fewer sets reuses the same draws."""
    seeds = sorted(set(method) & set(reference))
    if len(seeds) < 2:
        raise ValueError(f"a paired bootstrap needs two or more seeds in common, got {seeds}")
    rng = np.random.default_rng(seed)
    sizes = {name: len(rows) for name, rows in sorted(method[seeds[0]].items())}
    draws = {name: rng.integers(0, size, size=(replicates, size)) for name, size in sizes.items()}
    drawn_seeds = rng.integers(0, len(seeds), size=(replicates, len(seeds)))
    full = {name: slice(None) for name in sizes}

    def differences(picks) -> list[dict[str, np.ndarray]]:  # per seed: score -> method − reference
        pairs = [
            (_scores(method[s], picks, domain, general), _scores(reference[s], picks, domain, general)) for s in seeds
        ]
        return [{key: a[key] - b[key] for key in a} for a, b in pairs]

    replicated, points = differences(draws), differences(full)
    shrink = math.sqrt(len(seeds) / (len(seeds) - 1))
    out = {}
    for key in ("S", "S_D", "S_G"):
        d = np.stack([by_seed[key] for by_seed in replicated], axis=1)  # replicates × seeds
        m = d.mean(axis=1)
        star = m + shrink * (np.take_along_axis(d, drawn_seeds, axis=1).mean(axis=1) - m)
        low, high = np.percentile(star, [2.5, 97.5])
        out[key] = Bootstrap(statistics.mean(float(p[key]) for p in points), float(low), float(high), len(seeds))
    return out


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
