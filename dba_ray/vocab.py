"""Vocabulary coverage: the input-embedding rows the boost moves that the domain data
never touches.

Under ``boost_mode: gradient`` AdamW normalizes each weight's step by the second moment
of the gradient it sees. An embedding row that no domain token touches sees γ_t·ĝ_G
alone, so it takes a full lr-sized step along ĝ_G every step, whatever γ_t
(benchmarks/RESULTS.md, "Why the boost costs general ability under Adam"). The rows
that matter are those ĝ_G moves (the tokens general text used) and the domain never
uses. Counted on the driver from the arrays Stage 2 trains on, before step 1.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from dba_ray import artifact
from dba_ray.config import DBAConfig
from dba_ray.data.tokenize import IGNORE

# Quiet below 5% of the rows ĝ_G moves. The offline quickstart (byte tokens, Python
# docstrings as general text, code as the domain) leaves 2 of 104 (1.9%): two UTF-8
# lead bytes of rare characters. The byte-level benchmark's 23 of 148 (16%) already
# cost general score, and a 4,096-token BPE's 954 of 3,879 (25%) cost a fifth to a third
# of it (issue 28).
QUIET_BELOW = 0.05


def touched_ids(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The token ids whose input-embedding row gets a gradient from these rows: a
    position counts if it or a later one predicts a trained token (padding after the
    last trained token, and the last position, feed no loss)."""
    trained = labels[:, 1:] != IGNORE  # position j predicts token j + 1
    feeds_loss = np.flip(np.logical_or.accumulate(np.flip(trained, axis=1), axis=1), axis=1)
    return np.unique(ids[:, :-1][feeds_loss])


def input_embedding_name(model: torch.nn.Module) -> str:
    """The parameter name of the model's input embedding (the first name of a tied one)."""
    weight = model.get_input_embeddings().weight
    return next(name for name, p in model.named_parameters() if p is weight)


def general_rows(grad_source, name: str, vocab: int) -> np.ndarray | None:
    """Which embedding rows ĝ_G moves (its nonzero rows), or None when the artifact
    stores that tensor SVD-compressed (a low-rank product has no exact zero rows)."""
    if isinstance(grad_source, ray.ObjectRef):
        tensor = ray.get(grad_source).mean.get(name)
    else:
        tensor = artifact.mean_tensor(grad_source, name)
    if tensor is None:
        return None
    return (tensor[:vocab] != 0).any(dim=1).numpy()


def applies(d: DBAConfig) -> bool:
    """Whether a run blends ĝ_G into the gradient AdamW normalizes (the paper's boost)."""
    return d.ggb and d.boost_mode == "gradient" and d.boost > 0 and d.gamma_max > 0


def coverage_warning(run: str, moved: np.ndarray | None, vocab: int, domain: np.ndarray) -> str | None:
    """The line a run that ``applies`` gets when its domain data leaves at least
    QUIET_BELOW of the rows ĝ_G moves untouched. ``moved``: general_rows (None: every
    row of the vocabulary counts), ``domain``: touched_ids of the rows it trains on."""
    moved = np.ones(vocab, dtype=bool) if moved is None else moved
    untouched = moved.copy()
    untouched[domain[domain < vocab]] = False
    n_moved, n_untouched = int(moved.sum()), int(untouched.sum())
    if n_moved == 0 or n_untouched < QUIET_BELOW * n_moved:
        return None
    return (
        f"{run}: {n_untouched:,} of the {n_moved:,} input-embedding rows ĝ_G moves "
        f"({n_untouched / n_moved:.1%}) belong to tokens the domain data never uses; under "
        "boost_mode: gradient AdamW steps each of them by a full lr along ĝ_G every step, "
        "which costs general ability: consider dba.boost_mode: masked or update (README, The vocabulary warning)"
    )
