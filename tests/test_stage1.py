"""Stage 1 on the real local Ray cluster, against plain PyTorch references."""

import math

import numpy as np
import pytest
import ray
import torch
from conftest import make_docs, tiny_config, write_jsonl
from safetensors import safe_open

from dba_ray import artifact
from dba_ray.data import build_sequences, collect_arrays
from dba_ray.global_gradient import run_global_gradient, sequence_hash
from dba_ray.model import load_model

pytestmark = pytest.mark.usefixtures("ray_cluster")


def ordered_sequences(cfg):
    """The exact rows Stage 1 sees, in the order one worker sees them."""
    arrays = collect_arrays(build_sequences(cfg.stage1.data, cfg.model))
    return (torch.from_numpy(arrays["input_ids"]).long(), torch.from_numpy(arrays["labels"]).long())


def reference_gradients(model_cfg, ids, labels, batch_size):
    """Plain PyTorch: token-weighted mean gradient over all sequences, using the
    model's own (mean) loss scaled by each batch's token count; and the mean of the
    squared micro-batch gradients."""
    model = load_model(model_cfg)
    model.eval()
    total = 0
    mean = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    sq = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    n_batches = 0
    for i in range(0, len(ids), batch_size):
        b_ids, b_labels = ids[i : i + batch_size], labels[i : i + batch_size]
        n = int((b_labels[:, 1:] != -100).sum())
        model.zero_grad()
        model(input_ids=b_ids, labels=b_labels).loss.backward()
        for name, p in model.named_parameters():
            mean[name] += p.grad * n
            sq[name] += p.grad**2
        total += n
        n_batches += 1
    return {k: v / total for k, v in mean.items()}, {k: v / n_batches for k, v in sq.items()}, total


def one_process_fingerprint(ids: torch.Tensor, labels: torch.Tensor) -> str:
    """The data fingerprint of these rows as one process has it: the sum of every
    sequence's hash, over the pipeline's int32 rows."""
    rows = zip(ids.numpy().astype(np.int32), labels.numpy().astype(np.int32))
    return format(sum(sequence_hash(x, y) for x, y in rows) % 2**64, "016x")


def rel_error(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in b))
    den = math.sqrt(sum(float(b[k].float().pow(2).sum()) for k in b))
    return num / den


def test_global_gradient_equals_plain_pytorch_mean(tmp_path):
    # 317 sequences: two shards cannot hold as many each, and no row may be dropped.
    # Two workers; one worker's pass (v_G too) is the next test's.
    path = write_jsonl(tmp_path / "general.jsonl", make_docs(79))
    cfg = tiny_config(tmp_path, path, num_workers=2)
    ids, labels = ordered_sequences(cfg)
    ref_mean, _, ref_tokens = reference_gradients(cfg.model, ids, labels, 4)

    two = run_global_gradient(cfg)
    g2 = artifact.load_any(two.uri, model=load_model(cfg.model))
    assert two.meta["tokens"] == ref_tokens and two.meta["sequences"] == len(ids) == 317
    assert rel_error(g2.mean, ref_mean) < 1e-5
    assert two.meta["global_norm"] == pytest.approx(
        math.sqrt(sum(float(t.double().pow(2).sum()) for t in ref_mean.values())), rel=1e-5
    )
    # The data fingerprint is order-free: however the rows were spread over workers, it
    # is one process's over the source order. (That the artifact is this model's, its
    # parameter fingerprint, load_any checked above.)
    assert two.meta["data"]["fingerprint"] == one_process_fingerprint(ids, labels)


def test_equals_bias_corrected_adam_first_moment(tmp_path):
    """The paper's definition: AdamW at lr=0 with β1 → 1. With every batch holding the
    same number of tokens, Adam's bias-corrected first moment after t steps weights
    batch i by β1^(t-i)(1-β1)/(1-β1^t), within (t-1)(1-β1)/2 (3.5e-6 here) of 1/t,
    and fp32 rounding over t lerp steps adds about t·6e-8; 1e-4 covers both with room
    for summation order, while a wrong definition (sum, or a per-sequence mean) is off
    by O(1)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 262, (32, 24), generator=gen)
    ds = ray.data.from_items(
        [{"input_ids": r.numpy().astype(np.int32), "labels": r.numpy().astype(np.int32)} for r in ids]
    )
    # One worker, v_G kept, no checkpoints: Stage 1's default path, each micro-batch
    # summed as it comes (test_stage1_sums has more workers, test_recovery checkpoints).
    cfg = tiny_config(tmp_path, None, to_object_store=True, second_moment=True)
    result = run_global_gradient(cfg, dataset=ds, write=False)
    assert result.uri is None and result.ref is not None
    got = artifact.load_any(result.ref, model=load_model(cfg.model))
    ours = got.mean
    _, ref_sq, _ = reference_gradients(cfg.model, ids, ids, 4)
    assert rel_error(got.second_moment, ref_sq) < 1e-5

    model = load_model(cfg.model)
    model.eval()
    beta1 = 1 - 1e-6
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(beta1, 0.999), weight_decay=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    t = 0
    for i in range(0, len(ids), 4):
        opt.zero_grad()
        model(input_ids=ids[i : i + 4], labels=ids[i : i + 4]).loss.backward()
        opt.step()
        t += 1
    adam = {n: opt.state[p]["exp_avg"] / (1 - beta1**t) for n, p in model.named_parameters()}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert rel_error(ours, adam) < 1e-4


# 1 worker (v_G checked too) and 3 (uneven shards); 2 workers run in
# tests/test_stage1_sums.py and test_node_loss.py.
@pytest.mark.parametrize("workers", [1, 3])
def test_sharded_stage1_equals_one_process(tmp_path, workers):
    """stage1.parallel fsdp: ĝ_G equals one process over the same rows (317 sequences in
    micro-batches of 4: the shards are uneven and the last batches partial), each rank
    writes only its own rows, and a reader of any layout pieces them together. With one
    worker the global micro-batches are the source order's, so v_G equals it too (more
    workers: tests/test_stage1_sums.py, where the grouping is known)."""
    path = write_jsonl(tmp_path / "general.jsonl", make_docs(79))
    cfg = tiny_config(tmp_path, path, num_workers=workers, parallel="fsdp", second_moment=True)
    ids, labels = ordered_sequences(cfg)
    ref_mean, ref_sq, ref_tokens = reference_gradients(cfg.model, ids, labels, 4)

    result = run_global_gradient(cfg)
    meta = result.meta
    assert (meta["tokens"], meta["sequences"], meta["parallel"]) == (ref_tokens, 317, "fsdp")
    # Row blocks are format 2: a reader of format 1 would take one rank's rows as a tensor.
    assert meta["format_version"] == 2 and meta["stage1_settings"]["global_micro_batch"] == 4 * workers
    blocks = sorted((info["part"], info["rank"], info["ranks"]) for info in meta["files"].values())
    assert blocks == sorted((part, r, workers) for part in ("mean_gradient", "second_moment") for r in range(workers))
    model = load_model(cfg.model)
    whole = artifact.load_any(result.uri, model=model)
    assert rel_error(whole.mean, ref_mean) < 1e-6
    assert meta["global_norm"] == pytest.approx(
        math.sqrt(sum(float(t.double().pow(2).sum()) for t in ref_mean.values())), rel=1e-6
    )
    if workers == 1:
        assert rel_error(whole.second_moment, ref_sq) < 1e-5
    # Every file holds one rank's rows: for each tensor, as many rows as FSDP2 gives it.
    embed = "model.embed_tokens.weight"
    rows = model.get_parameter(embed).shape[0]
    per = -(-rows // workers)
    for info_name, info in meta["files"].items():
        if info["part"] == "mean_gradient":
            with safe_open(f"{result.uri}/{info_name}", "pt") as f:
                held = f.get_slice(embed).get_shape()[0]
            assert held == max(0, min(per, rows - info["rank"] * per))
    # A Stage 2 rank of another layout (2 FSDP ranks) reads only its rows.
    half = -(-rows // 2)
    second_half = artifact.load(result.uri, rows={embed: (half, rows)})
    assert torch.equal(second_half.mean[embed], whole.mean[embed][half:])
    assert torch.equal(second_half.second_moment[embed], whole.second_moment[embed][half:])
