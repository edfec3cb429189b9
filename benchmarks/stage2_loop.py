"""The Stage 2 training loop against a plain PyTorch loop, in one run; then what a
checkpoint and an evaluation cost, each as a fraction of a step.

Both sides train the same model on the same sequences with AdamW: the plain loop in
this process (forward, backward, clipping, AdamW.step), Stage 2 as `run_train` of the
vanilla method in one Ray Train worker, evaluation and checkpoints off. A step's time on
the Stage 2 side is its ``step_s`` in the run's curves (from the end of the previous
step to the end of this one, everything the loop does in between included); the first
``--warmup`` steps of both sides are left out. Plain and Stage 2 blocks alternate and
each pair gives one ratio of steps/s; the median and the spread over the pairs are
reported. The plain loop's model FLOPs utilization is reported beside it, against the
measured dense matmul rate of the device (and, on a GPU whose peak is known, against
that).

    python benchmarks/stage2_loop.py
    python benchmarks/stage2_loop.py --gpu --dtype bfloat16 --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import add_ray_side_args, emit, init_ray, sized_llama, write_text

from dba_ray.config import Config
from dba_ray.data import build_sequences
from dba_ray.loss import token_loss_sum
from dba_ray.model import load_model
from dba_ray.trainer import run_train

# Dense bf16 peak FLOP/s from the vendors' data sheets (SXM parts, no sparsity).
NOMINAL_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def make_config(args, out_dir: str, data: str, eval_sets: tuple = (), **train) -> Config:
    return Config.model_validate({
        "output_dir": out_dir,
        "ray": {"num_cpus": args.threads + 2},
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": args.dtype,
                  "builtin_config": sized_llama(args.hidden, args.layers)},
        "train": {
            "data": {"path": data, "seq_len": args.seq}, "batch_size": args.batch, "max_steps": args.steps,
            "num_workers": 1, "cpus_per_worker": args.threads, "use_gpu": args.gpu,
            "eval_every": 0, "checkpoint_every": 0, "progress_interval_s": 60, **train,
        },
        "eval": {"sets": list(eval_sets)},
    })  # fmt: skip


def plain_steps(cfg: Config, ids: torch.Tensor, labels: torch.Tensor, n: int) -> list[float]:
    """Seconds per step of a plain loop over the same sequences: ``n`` steps."""
    device = torch.device("cuda" if cfg.train.use_gpu else "cpu")
    model = load_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.schedule.lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    B, times = cfg.train.batch_size, []
    mark = time.perf_counter()
    for step in range(n):
        i = (step * B) % (len(ids) - B + 1)
        x, y = ids[i : i + B].to(device), labels[i : i + B].to(device)
        with autocast or torch.autocast("cpu", enabled=False):
            loss, count = token_loss_sum(model, x, y)
            (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - mark)
        mark = now
    return times


def stage2_steps(cfg: Config, name: str) -> list[float]:
    """``step_s`` of each step of one Stage 2 run (a fresh output folder each time)."""
    result = run_train(cfg.model_copy(update={"output_dir": cfg.output_dir + "/" + name}), "direct")
    curves = Path(result.model_dir).parent / "curves.jsonl"
    rows = [json.loads(line) for line in curves.read_text().splitlines()]
    return [r["step_s"] for r in rows if r["kind"] == "train"]


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the device's practical dense peak."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40, help="steps per block")
    ap.add_argument("--warmup", type=int, default=5, help="first steps of each block left out")
    ap.add_argument("--blocks", type=int, default=5, help="blocks per side (at least 5)")
    ap.add_argument("--every", type=int, default=10, help="checkpoint / evaluation interval of the cost runs")
    add_ray_side_args(ap)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="stage2-bench-"))
    data = write_text(tmp / "domain.jsonl", 400)
    held_out = write_text(tmp / "held_out.jsonl", 20)
    cfg = make_config(args, str(tmp / "out"), data)
    init_ray(args, cfg.ray.num_cpus)
    rows = build_sequences(cfg.train.data, cfg.model).take_all()
    ids = torch.tensor(np.stack([r["input_ids"] for r in rows]), dtype=torch.long)
    labels = torch.tensor(np.stack([r["labels"] for r in rows]), dtype=torch.long)

    # Steady state: the median step after the warm-up of each block.
    def steady(times: list[float]) -> float:
        return statistics.median(times[args.warmup :])

    plain, stage2 = [], []
    for b in range(args.blocks):
        plain.append(steady(plain_steps(cfg, ids, labels, args.steps)))
        stage2.append(steady(stage2_steps(cfg, f"loop{b}")))
    ratios = sorted(p / s for p, s in zip(plain, stage2))  # Stage 2 steps/s over plain steps/s

    # A checkpoint's and an evaluation's cost: the extra time of the steps that follow one.
    step = statistics.median(stage2)
    costs = {}
    held_out_set = {"name": "held_out", "kind": "domain", "data": {"path": held_out, "seq_len": args.seq}}
    for what, train in [
        ("checkpoint", {"checkpoint_every": args.every}),
        ("evaluation", {"eval_every": args.every, "eval_sets": [held_out_set]}),
    ]:
        run_cfg = make_config(args, cfg.output_dir, data, **train)
        times = stage2_steps(run_cfg, f"{what}-cost")
        after = [times[i] for i in range(args.every, len(times) - 1, args.every)]  # step i+1 follows step i's
        costs[f"{what}_fraction_of_step"] = round((statistics.median(after) - step) / step, 3)

    device = torch.device("cuda" if args.gpu else "cpu")
    n_params = sum(p.numel() for p in load_model(cfg.model).parameters())
    tokens_per_s = args.batch * args.seq / statistics.median(plain)
    # Training FLOPs per token: 6 per parameter, plus attention's 12·layers·hidden·seq.
    flops = tokens_per_s * (6 * n_params + 12 * args.layers * args.hidden * args.seq)
    peak = matmul_rate(device, getattr(torch, args.dtype))
    nominal = next((v for k, v in NOMINAL_BF16_PEAK.items() if args.gpu and k in torch.cuda.get_device_name()), None)
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if args.gpu else ""),
        "parameters": n_params,
        "dtype": args.dtype,
        "batch": f"{args.batch}x{args.seq}",
        "blocks": f"{args.blocks} x {args.steps} steps per side ({args.warmup} warm-up left out)",
        "plain_step_ms": round(statistics.median(plain) * 1e3, 2),
        "stage2_step_ms": round(step * 1e3, 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)],
        "meets_goal": statistics.median(ratios) >= 0.95,
        **costs,
        "plain_tokens_per_s": round(tokens_per_s, 1),
        "plain_mfu_of_measured_matmul": round(flops / peak, 3),
        "plain_mfu_of_nominal_peak": round(flops / nominal, 3) if nominal else None,
    }
    emit(res, args.out)


if __name__ == "__main__":
    main()
