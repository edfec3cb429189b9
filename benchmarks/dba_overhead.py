"""Time per optimizer step and memory of the DBA update against a plain AdamW step, on
the same model and batch, in one run.

A "step" is forward + backward + clipping + AdamW.step(); the DBA step adds
``DBA.apply`` (dot products, in-place blend) and the c_t learning-rate scaling. Steps
alternate in blocks (plain, DBA, plain, ...) and the median block is reported, so
drift of the machine hits both sides alike.

    python benchmarks/dba_overhead.py                      # CPU, fp32 ĝ_G
    python benchmarks/dba_overhead.py --grad-dtype bfloat16
    python benchmarks/dba_overhead.py --device cuda --dtype bfloat16 --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from common import emit, sized_llama

from dba_ray.config import DBAConfig, ModelConfig
from dba_ray.dba import DBA
from dba_ray.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="steps per block")
    ap.add_argument("--blocks", type=int, default=5, help="blocks per side")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="model weights")
    ap.add_argument("--grad-dtype", default="float32", help="ĝ_G held in training")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    mcfg = ModelConfig(
        dtype=args.dtype,
        builtin_config=sized_llama(args.hidden, args.layers),
    )
    device = torch.device(args.device)
    model = load_model(mcfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(6, 262, (args.batch, args.seq), device=device)
    ghat = {n: torch.randn_like(p, dtype=torch.float32) * 1e-3 for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    mem_before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    dba = DBA(model.named_parameters(), ghat, 10_000, DBAConfig(grad_dtype=args.grad_dtype))
    dba_bytes = sum(h.numel() * h.element_size() for h in dba.g)
    mem_dba = (torch.cuda.memory_allocated() - mem_before) if device.type == "cuda" else dba_bytes
    del ghat

    step_no = 0

    def block(use_dba: bool) -> float:
        nonlocal step_no
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if use_dba:
                c = dba.apply(step_no).c
                for g in opt.param_groups:
                    g["lr"] = 1e-5 * c
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_no += 1
        sync()
        return (time.perf_counter() - start) / args.steps

    block(False), block(True)  # warm-up: allocator, kernels, optimizer state
    plain, boosted = [], []
    for _ in range(args.blocks):
        plain.append(block(False))
        boosted.append(block(True))
    p_med, d_med = statistics.median(plain), statistics.median(boosted)
    res = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"),
        "parameters": n_params,
        "model_dtype": args.dtype,
        "grad_dtype": args.grad_dtype,
        "batch": f"{args.batch}x{args.seq}",
        "plain_step_ms": round(p_med * 1e3, 2),
        "dba_step_ms": round(d_med * 1e3, 2),
        "time_overhead": round(d_med / p_med - 1, 4),
        "dba_extra_bytes": mem_dba,
        "dba_extra_bytes_per_param": round(mem_dba / n_params, 3),
    }
    emit(res, args.out)


if __name__ == "__main__":
    main()
