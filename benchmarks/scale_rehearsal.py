"""Stage 1 at the sizes users run, on CPU: per-worker peak memory under
``stage1.parallel`` ddp and fsdp, sampled from every Ray worker process.

The models are shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 query / 2 key-value
heads, intermediate 4864, tied embeddings) with a 26k-token vocabulary, random weights,
saved with ``save_pretrained`` (the byte tokenizer beside them: which ids the text uses
does not change what a step holds), and two smaller sizes of the same shape. Each
(size, mode) runs ``dba-ray global-gradient`` as a user would, in its own process and
Ray cluster, while a sampler reads the RSS of every ``ray::`` process every
``--interval`` seconds; a Train worker's peak is the largest RSS its process reached.

    python benchmarks/scale_rehearsal.py --sizes small,medium,full --workers 2 --out rehearsal.json

Runs take minutes (small) to tens of minutes (full) on 2 cores, and the full size needs
about 12 GB per ddp worker: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from common import emit, write_text
from transformers import Qwen2Config, Qwen2ForCausalLM

from dba_ray.model import byte_tokenizer

# (hidden, layers, intermediate, query heads, key-value heads)
SIZES = {
    "small": (224, 6, 1216, 7, 1),
    "medium": (448, 12, 2432, 7, 1),
    "full": (896, 24, 4864, 14, 2),
}
VOCAB = 26_000


def build_model(size: str, folder: Path) -> int:
    """Save a random Qwen2-shaped model of ``size`` in ``folder``; its parameter count."""
    hidden, layers, inter, heads, kv = SIZES[size]
    tok = byte_tokenizer()
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


class Sampler:
    """Peak RSS of every ``ray::`` process seen, by pid (with its last title)."""

    def __init__(self, interval: float):
        self.interval, self.peaks, self.titles = interval, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                title = " ".join(proc.info["cmdline"] or [])
                if not title.startswith("ray::") or proc.info["memory_info"] is None:
                    continue
                pid = proc.info["pid"]
                self.peaks[pid] = max(self.peaks.get(pid, 0), proc.info["memory_info"].rss)
                self.titles[pid] = title
            self._stop.wait(self.interval)

    def train_worker_peaks(self) -> list[int]:
        return sorted((rss for pid, rss in self.peaks.items() if "TrainWorker" in self.titles[pid]), reverse=True)


def run_stage1(model_dir: Path, data: str, mode: str, workers: int, work: Path, interval: float) -> dict:
    """One ``dba-ray global-gradient`` run; its peaks, wall time and artifact facts."""
    cfg = {
        "output_dir": str(work / "out"),
        "model": {"name_or_path": str(model_dir)},
        "ray": {"num_cpus": workers + 2},
        "stage1": {
            "data": {"path": data, "seq_len": 256},
            "max_tokens": 8192,
            "batch_size": 4,
            "num_workers": workers,
            "parallel": mode,
            "second_moment": True,
            "output": str(work / "gg"),
        },
    }
    path = work / "stage1.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    with Sampler(interval) as sampler:
        proc = subprocess.run([sys.executable, "-m", "dba_ray", "global-gradient", str(path)], capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage 1 ({mode}) failed:\n{proc.stderr.decode()[-3000:]}")
    meta = json.loads((work / "gg" / "meta.json").read_text())
    peaks = sampler.train_worker_peaks()
    return {
        "mode": mode,
        "workers": workers,
        "wall_s": round(time.monotonic() - start, 1),
        "tokens": meta["tokens"],
        "worker_peak_gb": [round(p / 1e9, 3) for p in peaks[:workers]],
        "any_ray_process_peak_gb": round(max(sampler.peaks.values()) / 1e9, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small", help="comma-separated: " + ", ".join(SIZES))
    ap.add_argument("--modes", default="ddp,fsdp")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_text(Path(tmp) / "general.jsonl", 400)
        for size in args.sizes.split(","):
            model_dir = Path(tmp) / size
            params = build_model(size, model_dir)
            for mode in args.modes.split(","):
                work = Path(tmp) / f"{size}-{mode}"
                work.mkdir()
                row = {
                    "size": size,
                    "parameters": params,
                    **run_stage1(model_dir, data, mode, args.workers, work, args.interval),
                }
                row["bytes_per_param"] = round(max(row["worker_peak_gb"]) * 1e9 / params, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
    emit(
        {"machine": f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB", "runs": rows},
        args.out,
    )


if __name__ == "__main__":
    main()
