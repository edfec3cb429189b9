"""The token loss, in one place: Stage 1's ĝ_G, Stage 2's step and evaluation all
score a causal LM by the cross-entropy of each next token, summed over the tokens that
are trained (labels other than ``IGNORE``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dba_ray.data.tokenize import IGNORE


def next_token_logits(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor):
    """(fp32 logits at each position but the last, the next token each one predicts)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return logits, labels[:, 1:]


def nll_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy of every trained target token."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def nll_rows(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum of the cross-entropy of its trained target tokens."""
    return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none").sum(-1)


def token_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor):
    """(sum of per-token cross-entropy, number of trained tokens) of one batch."""
    logits, target = next_token_logits(model, input_ids, labels)
    return nll_sum(logits, target), (target != IGNORE).sum()
