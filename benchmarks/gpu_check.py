"""The figures a GPU machine should give, in one command: Stage 1 against a plain loop,
the DBA step's and the fisher anchor's overhead, the Stage 2 loop against a plain loop
with the plain loop's model FLOPs utilization, and a 1-GPU FSDP run over NCCL (its
Stage 1 sharded too, with rank 0's device peak set against `dba-ray plan`'s). Each part
runs as its own process (its own Ray cluster); one JSON and a table come out.

    bash benchmarks/gpu_check.sh                  # one GPU, ~100M parameters, bf16
    bash benchmarks/gpu_check.sh --cpu --tiny     # the same path on CPU, a tiny model

Sized to finish in under 8 minutes on one H200; ``--cpu --tiny`` takes a few minutes on
2 cores. The test suite runs ``--cpu --tiny --skip fsdp`` (and validates the FSDP part's
config): the FSDP part is a plain `dba-ray run`, which other tests cover under FSDP, and
its 1.5 minutes on 2 cores are the suite's to spend elsewhere. A part that fails is
recorded with its error and the rest still run; the exit code is 1 then.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import sized_llama, write_text

from dba_ray import artifact, memory_plan
from dba_ray.config import load_config
from dba_ray.model import load_empty_model

HERE = Path(__file__).resolve().parent
PARTS = ("stage1", "dba_step", "fisher_step", "stage2", "fsdp")

SIZES = {  # ~100M parameters on a GPU; seconds of work per part on CPU
    "full": {"model": ["--hidden", "768", "--layers", "12"], "stage1": ["--max-tokens", "2e6", "--seq-len", "1024", "--batch-size", "16"],
             "stage2": ["--seq", "1024", "--batch", "16", "--steps", "60"], "dba": ["--seq", "1024", "--batch", "16"],
             "fsdp": {"hidden": 768, "layers": 12, "seq": 1024, "batch": 16, "steps": 30}},
    "tiny": {"model": ["--hidden", "64", "--layers", "2"], "stage1": ["--max-tokens", "8000", "--seq-len", "64", "--batch-size", "4"],
             "stage2": ["--seq", "64", "--batch", "4", "--steps", "12", "--warmup", "2", "--every", "4", "--blocks", "1"],
             "dba": ["--seq", "64", "--batch", "4", "--steps", "2", "--blocks", "2", "--repeats", "1"],
             "fsdp": {"hidden": 64, "layers": 2, "seq": 64, "batch": 4, "steps": 4}},
}  # fmt: skip


def fsdp_config(tmp: Path, data: str, size: dict, gpu: bool) -> Path:
    """A DBA run under FSDP on one worker, Stage 1 sharded too: NCCL on a GPU, gloo on CPU."""
    tree = {
        "output_dir": str(tmp / "fsdp"),
        "ray": {"num_cpus": 4},
        "model": {"name_or_path": "builtin:tiny-llama", "builtin_config": sized_llama(size["hidden"], size["layers"])},
        "stage1": {"data": {"path": data, "seq_len": size["seq"]}, "batch_size": size["batch"], "max_tokens": 50_000,
                   "use_gpu": gpu, "parallel": "fsdp", "second_moment": True},
        "train": {"data": {"path": data, "seq_len": size["seq"]}, "batch_size": size["batch"], "max_steps": size["steps"],
                  "parallel": "fsdp", "num_workers": 1, "use_gpu": gpu, "dba": {"boost": 2}},
        "methods": ["dba"],
        # Both kinds, or the joint score S is undefined.
        "eval": {"sets": [{"name": "held_out", "kind": "domain", "data": {"path": data, "seq_len": size["seq"]}},
                          {"name": "general", "kind": "general", "data": {"path": data, "seq_len": size["seq"]}}]},
    }  # fmt: skip
    path = tmp / "fsdp.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def stage1_against_plan(tmp: Path) -> dict:
    """The FSDP run's Stage 1: rank 0's torch.cuda.max_memory_allocated against what
    `dba-ray plan` gives its device (less the CUDA context, which the allocator does
    not count)."""
    meta = json.loads((tmp / "fsdp" / "global_gradient" / "meta.json").read_text())
    if meta.get("device_peak_bytes") is None:
        return {}
    cfg = load_config(str(tmp / "fsdp.yaml"))
    shape = memory_plan.model_shape(load_empty_model(cfg.model))
    planned = memory_plan.stage1_phase(shape, cfg, artifact.MAX_SHARD_BYTES).peak().device - memory_plan.CUDA_CONTEXT
    return {
        "stage1_device_peak_gib": round(meta["device_peak_bytes"] / 2**30, 3),
        "stage1_planned_gib": round(planned / 2**30, 3),
        "stage1_measured_over_planned": round(meta["device_peak_bytes"] / planned, 3),
    }


def run_part(name: str, argv: list[str], out: Path | None) -> dict:
    """One part as a child process; its JSON (``--out``) or, for a CLI run, its exit."""
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=HERE.parent)
    res: dict = {"seconds": round(time.monotonic() - start, 1)}
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {**res, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    if out is not None:
        res.update(json.loads(out.read_text()))
    print(f"gpu_check: {name} done in {res['seconds']} s", file=sys.stderr)
    return res


def table(results: dict) -> str:
    """The figures a reader wants, one line each, with the goal where there is one."""
    rows = [
        ("Stage 1 / plain loop (tokens/s)", "stage1", "ratio", ">= 0.95"),
        ("DBA step / plain step (time)", "dba_step", "time_ratio", "<= 1.03"),
        ("fisher-anchor step / plain step (time)", "fisher_step", "time_ratio", "<= 1.03"),
        ("DBA extra memory (B/param)", "dba_step", "extra_bytes_per_param", ""),
        ("fisher extra memory (B/param)", "fisher_step", "extra_bytes_per_param", ""),
        ("Stage 2 loop / plain loop (steps/s)", "stage2", "ratio", ">= 0.95"),
        ("checkpoint cost (fraction of a step)", "stage2", "checkpoint_fraction_of_step", ""),
        ("evaluation cost (fraction of a step)", "stage2", "evaluation_fraction_of_step", ""),
        ("plain loop MFU (of measured matmul rate)", "stage2", "plain_mfu_of_measured_matmul", ""),
        ("plain loop MFU (of nominal bf16 peak)", "stage2", "plain_mfu_of_nominal_peak", ""),
        ("FSDP run, 1 worker", "fsdp", "ok", ""),
        ("its sharded Stage 1: measured / planned device peak", "fsdp", "stage1_measured_over_planned", "0.85–1.15"),
    ]
    lines = ["| figure | value | goal |", "|---|---:|---|"]
    for label, part, key, goal in rows:
        r = results.get(part, {})
        value = f"failed: {r['error']}" if "error" in r else "skipped" if r.get("skipped") else r.get(key, "n/a")
        lines.append(f"| {label} | {value} | {goal} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (no GPU needed)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and few steps: checks the path")
    ap.add_argument("--out", type=Path, default=HERE / "gpu_check.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out (recorded as skipped)")
    ap.add_argument("--address", default=None, help="the Ray parts join this running cluster (the test suite's)")
    args = ap.parse_args()

    size = SIZES["tiny" if args.tiny else "full"]
    gpu = not args.cpu
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data = write_text(tmp / "text.jsonl", 300 if args.tiny else 4000)
    py = [sys.executable]
    dev = ["--device", "cuda", "--dtype", "bfloat16"] if gpu else []
    ray_dev = (["--gpu", "--dtype", "bfloat16"] if gpu else []) + (["--address", args.address] if args.address else [])
    parts = {
        "stage1": [*py, str(HERE / "stage1_throughput.py"), data, *size["model"], *size["stage1"], *ray_dev],
        "dba_step": [*py, str(HERE / "dba_overhead.py"), "--variant", "dba", *size["model"], *size["dba"], *dev],
        "fisher_step": [*py, str(HERE / "dba_overhead.py"), "--variant", "fisher", *size["model"], *size["dba"], *dev],
        "stage2": [*py, str(HERE / "stage2_loop.py"), *size["model"], *size["stage2"], *ray_dev],
        "fsdp": [*py, "-m", "dba_ray", "run", str(fsdp_config(tmp, data, size["fsdp"], gpu))],
    }
    results = {"device": "cpu" if args.cpu else "gpu", "size": "tiny" if args.tiny else "full"}
    for name, argv in parts.items():
        if name in args.skip:
            results[name] = {"skipped": True}
        elif name == "fsdp":  # a CLI run: its report, not a JSON of its own
            results[name] = run_part(name, argv, None)
            if "error" not in results[name]:
                report = json.loads((tmp / "fsdp" / "report.json").read_text())
                results[name].update(ok=True, S=report["results"]["dba"]["S"], **stage1_against_plan(tmp))
        else:
            out = tmp / f"{name}.json"
            results[name] = run_part(name, [*argv, "--out", str(out)], out)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"gpu_check: wrote {args.out}", file=sys.stderr)
    sys.exit(1 if any("error" in r for r in results.values() if isinstance(r, dict)) else 0)


if __name__ == "__main__":
    main()
