"""Time and memory of a DBA step against a plain AdamW step, on the same model and batch,
in one run.

A step is forward + backward + clipping + AdamW.step(); a DBA step adds ``DBA.apply``
and, for the variant, what it holds and does:

- ``dba``: GGB + DC norm (the paper's update): ĝ_G held, three reduced scalars, a blend.
- ``fisher``: the fisher anchor alone (GGB and DC off), the path the README recommends
  among the anchors: ĝ_G is not used, but θ0 and the v_G weights are held, and each step
  adds λ·w⊙(θ − θ0).
- ``dba-fisher``: both.

Time: steps alternate in blocks (plain, variant, plain, ...), and each block pair gives
one ratio; the median ratio and its spread over the pairs are reported, so drift of the
machine hits both sides alike. On a shared VM that spread is a few per cent, as wide as
the goal, so ``DBA.apply`` is also timed alone (median of 100 calls on one backward's
gradients) and reported as a fraction of the plain step: the variant's own cost without
the whole step's noise. Memory: each side runs again in a child process of its
own, and the extra memory is the variant's real peak minus the plain step's, measured
over the training steps only (the peak RSS reset after warm-up on CPU,
``torch.cuda.max_memory_allocated`` on GPU), per parameter.

    python benchmarks/dba_overhead.py                                  # CPU, dba, fp32 ĝ_G
    python benchmarks/dba_overhead.py --variant fisher
    python benchmarks/dba_overhead.py --grad-dtype bfloat16
    python benchmarks/dba_overhead.py --device cuda --dtype bfloat16 --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from common import emit, sized_llama

from dba_ray.config import DBAConfig, ModelConfig
from dba_ray.dba import DBA
from dba_ray.model import load_model

VARIANTS = {
    "dba": {},
    "fisher": {"ggb": False, "dc": "none", "anchor": "fisher"},
    "dba-fisher": {"anchor": "fisher"},
}


class Bench:
    """The model, one batch, AdamW and (unless ``plain``) the variant's DBA."""

    def __init__(self, args, plain: bool):
        torch.manual_seed(0)
        self.device = torch.device(args.device)
        mcfg = ModelConfig(dtype=args.dtype, builtin_config=sized_llama(args.hidden, args.layers))
        self.model = load_model(mcfg).to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.ids = torch.randint(6, 262, (args.batch, args.seq), device=self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.dba = None
        if not plain:
            cfg = DBAConfig(grad_dtype=args.grad_dtype, **VARIANTS[args.variant])
            named = list(self.model.named_parameters())
            # Stand-ins for an artifact's ĝ_G and v_G (v_G >= ĝ_G², as the real ones are).
            # Made in the training dtype, as loading an artifact would leave them.
            dtype = getattr(torch, cfg.grad_dtype)
            ghat = {n: (torch.randn_like(p, dtype=torch.float32) * 1e-3).to(dtype) for n, p in named}
            v = {n: ghat[n].float().square() + 1e-6 for n, _ in named} if cfg.anchor == "fisher" else None
            self.dba = DBA(named, ghat, 10_000, cfg, second_moment=v)
            del ghat, v
        self.t = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def steps(self, n: int, use_dba: bool) -> float:
        """Run ``n`` steps; seconds per step."""
        self.sync()
        start = time.perf_counter()
        for _ in range(n):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            if use_dba:
                c = self.dba.apply(self.t).c
                for g in self.opt.param_groups:
                    g["lr"] = 1e-5 * c
            self.opt.step()
            if use_dba:
                self.dba.after_step(1e-5 * c)
            self.opt.zero_grad(set_to_none=True)
            self.t += 1
        self.sync()
        return (time.perf_counter() - start) / n

    def apply_alone(self, calls: int) -> float:
        """Seconds of one ``DBA.apply`` (median of ``calls``) on one backward's
        gradients: the variant's own cost, without the step-to-step noise of a whole
        step that the side-by-side blocks carry."""
        self.model(input_ids=self.ids, labels=self.ids).loss.backward()
        times = []
        for _ in range(calls):
            self.sync()
            start = time.perf_counter()
            self.dba.apply(self.t)
            self.sync()
            times.append(time.perf_counter() - start)
        self.opt.zero_grad(set_to_none=True)
        return statistics.median(times)


def peak_of_steps(args, plain: bool) -> int:
    """Bytes: the real peak over ``args.steps`` steps after a warm-up step."""
    bench = Bench(args, plain)
    bench.steps(1, not plain)  # allocator, kernels, AdamW state
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        bench.steps(args.steps, not plain)
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    bench.steps(args.steps, not plain)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child_peak(plain: bool, repeats: int) -> int:
    """``peak_of_steps`` in fresh processes, so that neither side sees the other's
    memory; the median of ``repeats`` (the CPU allocator's peak moves by a few MB)."""
    argv = [sys.executable, __file__, *sys.argv[1:], "--peak-of", "plain" if plain else "variant"]
    # A fixed mmap threshold: glibc then returns every freed large block (set-up
    # temporaries) to the system instead of keeping it in the heap, and in the RSS.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    runs = [subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout for _ in range(repeats)]
    return int(statistics.median(int(out.strip().splitlines()[-1]) for out in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="dba")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="steps per block")
    ap.add_argument("--blocks", type=int, default=7, help="blocks per side (at least 5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="model weights")
    ap.add_argument("--grad-dtype", default="float32", help="ĝ_G (and the anchor's arrays) in training")
    ap.add_argument("--repeats", type=int, help="child processes per side for the peak (default: 3 on CPU, 1 on CUDA)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--peak-of", choices=["plain", "variant"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_of:  # the child of child_peak
        print(peak_of_steps(args, plain=args.peak_of == "plain"))
        return

    bench = Bench(args, plain=False)
    bench.steps(1, False), bench.steps(1, True)  # warm-up: allocator, kernels, optimizer state
    plain, variant = [], []
    for _ in range(args.blocks):
        plain.append(bench.steps(args.steps, False))
        variant.append(bench.steps(args.steps, True))
    ratios = sorted(v / p for p, v in zip(plain, variant))
    apply_s = bench.apply_alone(100)
    repeats = args.repeats or (1 if bench.device.type == "cuda" else 3)  # CUDA's allocated peak is exact
    peak_plain, peak_variant = child_peak(True, repeats), child_peak(False, repeats)
    device = bench.device
    res = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"),
        "variant": args.variant,
        "parameters": bench.n_params,
        "model_dtype": args.dtype,
        "grad_dtype": args.grad_dtype,
        "batch": f"{args.batch}x{args.seq}",
        "blocks": f"{args.blocks} x {args.steps} steps per side",
        "plain_step_ms": round(statistics.median(plain) * 1e3, 2),
        "variant_step_ms": round(statistics.median(variant) * 1e3, 2),
        "time_ratio": round(statistics.median(ratios), 4),
        "time_ratio_range": [round(ratios[0], 4), round(ratios[-1], 4)],
        "meets_goal": statistics.median(ratios) <= 1.03,
        "apply_ms": round(apply_s * 1e3, 2),
        "apply_fraction_of_plain_step": round(apply_s / statistics.median(plain), 4),
        "peak_plain_bytes": peak_plain,
        "peak_variant_bytes": peak_variant,
        "extra_bytes_per_param": round((peak_variant - peak_plain) / bench.n_params, 2),
    }
    emit(res, args.out)


if __name__ == "__main__":
    main()
