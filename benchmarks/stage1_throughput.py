"""Stage 1 throughput against a plain PyTorch forward+backward loop, in one run.

Both sides process the same model and the same token sequences (those the Ray Data
pipeline makes from DATA): the baseline loops over them in this process, pre-tokenized;
Stage 1 streams them through Ray Data into one Ray Train worker. The ratio compares
steady-state tokens/s (first batch to last); the end-to-end wall time including Ray
start-up is reported beside it.

    python benchmarks/stage1_throughput.py ../shared/data/general/wikitext2.train.jsonl
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch
from common import add_ray_side_args, emit, init_ray, sized_llama

from dba_ray.config import Config
from dba_ray.data import build_sequences
from dba_ray.global_gradient import run_global_gradient
from dba_ray.loss import token_loss_sum
from dba_ray.model import load_model


def baseline_tokens_per_s(cfg: Config, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    model = load_model(cfg.model).to(cfg.stage1.use_gpu and "cuda" or "cpu")
    device = next(model.parameters()).device
    model.eval()
    bs = cfg.stage1.batch_size
    # Warm-up on the first batch (allocator, kernels), as Stage 1's start-up is excluded.
    loss, _ = token_loss_sum(model, ids[:bs].to(device), labels[:bs].to(device))
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    positions = 0
    for i in range(0, len(ids), bs):
        loss, _ = token_loss_sum(model, ids[i : i + bs].to(device), labels[i : i + bs].to(device))
        loss.backward()
        positions += ids[i : i + bs].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return positions / (time.perf_counter() - start), positions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="general text (JSON Lines with a 'text' field, or a folder)")
    ap.add_argument("--max-tokens", type=float, default=1.2e5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    add_ray_side_args(ap)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    out_dir = tempfile.mkdtemp(prefix="stage1-bench-")
    cfg = Config.model_validate(
        {
            "output_dir": out_dir,
            "ray": {"num_cpus": args.threads + 2},
            "model": {
                "name_or_path": "builtin:tiny-llama",
                "dtype": args.dtype,
                "builtin_config": sized_llama(args.hidden, args.layers),
            },
            "stage1": {
                "data": {"path": os.path.abspath(args.data), "seq_len": args.seq_len},
                "max_tokens": int(args.max_tokens),
                "batch_size": args.batch_size,
                "num_workers": 1,
                "cpus_per_worker": args.threads,
                "use_gpu": args.gpu,
                "progress_interval_s": 30,
            },
        }
    )
    n_params = sum(p.numel() for p in load_model(cfg.model).parameters())
    init_ray(args, cfg.ray.num_cpus)
    rows = build_sequences(cfg.stage1.data, cfg.model, max_tokens=cfg.stage1.max_tokens).take_all()
    ids = torch.tensor(np.stack([r["input_ids"] for r in rows]), dtype=torch.long)
    labels = torch.tensor(np.stack([r["labels"] for r in rows]), dtype=torch.long)

    base_tps, positions = baseline_tokens_per_s(cfg, ids, labels)
    start = time.perf_counter()
    result = run_global_gradient(cfg)
    wall = time.perf_counter() - start
    meta = result.meta
    stage1_positions = meta["sequences"] * meta["seq_len"]
    stage1_tps = stage1_positions / meta["loop_seconds"]
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if args.gpu else ""),
        "parameters": n_params,
        "dtype": args.dtype,
        "tokens": positions,
        "baseline_tokens_per_s": round(base_tps, 1),
        "stage1_tokens_per_s": round(stage1_tps, 1),
        "ratio": round(stage1_tps / base_tps, 3),
        "stage1_end_to_end_s": round(wall, 1),
        "stage1_end_to_end_tokens_per_s": round(stage1_positions / wall, 1),
    }
    emit(res, args.out)


if __name__ == "__main__":
    main()
