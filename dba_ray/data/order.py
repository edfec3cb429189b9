"""The order Stage 2 reads its data in: one seeded permutation per epoch, cut into
global batches, the same on every worker and after a resume; and, from it, which domain
rows a mixture run mixes with general ones and how many general rows that takes."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=2)
def epoch_permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def global_batch_rows(step: int, n: int, global_batch: int, steps_per_epoch: int, seed: int):
    """Rows of global batch ``step``: the same on every worker and after a resume."""
    epoch, i = divmod(step, steps_per_epoch)
    return epoch_permutation(n, seed + epoch)[i * global_batch : (i + 1) * global_batch]


def planned_steps(t, n_domain: int) -> int:
    """T of a domain-only run over ``n_domain`` sequences."""
    return t.max_steps or n_domain // (t.batch_size * t.num_workers * t.grad_accum) * t.epochs


def mixture_general_count(n_domain: int, ratio: float) -> int:
    return round(n_domain * ratio / (1 - ratio))


def mixture_domain_rows(t, n_domain: int) -> np.ndarray:
    """The domain sequences a mixture run mixes with general ones: those a domain-only
    run of the same max_steps trains on (all of them past one epoch), so that the
    general share is the ratio of what is trained, not of the whole domain file."""
    global_batch = t.batch_size * t.num_workers * t.grad_accum
    steps_per_epoch = n_domain // global_batch
    if not t.max_steps or steps_per_epoch == 0 or t.max_steps >= steps_per_epoch:
        return np.arange(n_domain)
    return np.sort(epoch_permutation(n_domain, t.seed)[: t.max_steps * global_batch])
