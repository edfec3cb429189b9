"""Evaluation metrics and scores (plain PyTorch).

For a text set: mean token NLL, perplexity, and next-token top-1 accuracy, the
normalized score (bounded, comparable across sets, and it drops with forgetting).
For a multiple-choice set: accuracy, each choice scored by its log-likelihood.
S_D and S_G are the mean normalized scores of the domain and general sets;
S = 2·S_D·S_G / (S_D + S_G).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dba_ray.data.tokenize import IGNORE
from dba_ray.loss import next_token_logits, nll_rows


@torch.no_grad()
def text_sums(
    model: torch.nn.Module,
    ids: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device,
    record: np.ndarray | None = None,
    records: int = 0,
) -> torch.Tensor:
    """[NLL sum, correct top-1 predictions, tokens] over the given rows (float64); with
    ``record`` (each row's record index), one such row per record: [records, 3]."""
    out = torch.zeros((records, 3) if record is not None else (1, 3), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for i in range(0, len(ids), batch_size):
        x = torch.from_numpy(ids[i : i + batch_size].astype(np.int64)).to(device)
        y = torch.from_numpy(labels[i : i + batch_size].astype(np.int64)).to(device)
        logits, target = next_token_logits(model, x, y)
        mask = target != IGNORE
        correct = (logits.argmax(-1) == target) & mask
        rows = torch.stack([nll_rows(logits, target).double(), correct.double().sum(-1), mask.double().sum(-1)], 1)
        at = torch.zeros(len(rows), dtype=torch.long, device=device)
        if record is not None:
            at = torch.from_numpy(record[i : i + batch_size].astype(np.int64)).to(device)
        out.index_add_(0, at, rows)
    model.train(was_training)
    return out if record is not None else out[0]


@torch.no_grad()
def choice_sums(
    model: torch.nn.Module, arrays: dict, batch_size: int, device, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """[correct, records] over this rank's records (``record % world == rank``)."""
    group, answers = arrays["group"], arrays["answers"]
    rows = np.nonzero(group % world == rank)[0]
    loglik = np.zeros(len(group))
    was_training = model.training
    model.eval()
    for i in range(0, len(rows), batch_size):
        idx = rows[i : i + batch_size]
        x = torch.from_numpy(arrays["input_ids"][idx].astype(np.int64)).to(device)
        y = torch.from_numpy(arrays["labels"][idx].astype(np.int64)).to(device)
        logits, target = next_token_logits(model, x, y)
        logp = torch.log_softmax(logits, -1)
        mask = target != IGNORE
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loglik[idx] = (picked * mask).sum(-1).double().cpu().numpy()
    model.train(was_training)
    correct = total = 0
    for r in range(rank, len(answers), world):
        mine = np.nonzero(group == r)[0]
        correct += int(np.argmax(loglik[mine]) == answers[r])
        total += 1
    return torch.tensor([correct, total], dtype=torch.float64, device=device)


def set_sums(model, arrays: dict, batch_size: int, device, rank: int = 0, world: int = 1):
    """This rank's share of one eval set's sums (all-reduce them across ranks)."""
    if "answers" in arrays:
        return choice_sums(model, arrays, batch_size, device, rank, world)
    per_record = {}
    if "record" in arrays:  # a per_record set: every rank returns all records' rows (zero where not its own)
        per_record = {"record": arrays["record"][rank::world], "records": int(arrays["record"].max()) + 1}
    return text_sums(
        model, arrays["input_ids"][rank::world], arrays["labels"][rank::world], batch_size, device, **per_record
    )


def set_metrics(sums) -> dict:
    """Metrics from a set's reduced sums: text sets have 3, choice sets 2; a per_record
    set's [records, 3] sums add ``records``, each record's [NLL sum, correct, tokens]."""
    if sums.dim() == 2:
        return {**text_metrics(sums.sum(0)), "records": sums.tolist()}
    if len(sums) == 2:
        correct, total = (float(x) for x in sums)
        return {"acc": correct / max(total, 1.0)}
    return text_metrics(sums)


def text_metrics(sums) -> dict[str, float]:
    nll_sum, correct, tokens = (float(x) for x in sums)
    nll = nll_sum / max(tokens, 1.0)
    return {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "acc": correct / max(tokens, 1.0)}


def score_sets(model, sets: dict[str, dict], kinds: dict[str, str], batch_size: int, device) -> dict:
    """One model on whole eval sets in one process: per-set metrics and S_D / S_G / S."""
    metrics = {name: set_metrics(set_sums(model, arrays, batch_size, device).cpu()) for name, arrays in sets.items()}
    return {"eval": metrics, **scores(metrics, kinds)}


def scored_tokens(arrays: dict) -> int:
    """Tokens one evaluation of a set scores (a forward pass each)."""
    return int((arrays["labels"][:, 1:] != IGNORE).sum())


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def scores(metrics: dict[str, dict[str, float]], kinds: dict[str, str]) -> dict[str, float]:
    """S_D, S_G, S from per-set metrics (``acc`` is each set's normalized score)."""

    def mean(kind):
        vals = [metrics[n]["acc"] for n, k in kinds.items() if k == kind]
        return sum(vals) / len(vals) if vals else float("nan")

    s_d, s_g = mean("domain"), mean("general")
    s = harmonic(s_d, s_g) if not (math.isnan(s_d) or math.isnan(s_g)) else float("nan")
    return {"S_D": s_d, "S_G": s_g, "S": s}
