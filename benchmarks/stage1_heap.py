"""Where a CPU Stage 1 rank's memory goes between and within micro-batches.

    python benchmarks/stage1_heap.py [--workers 2] [--steps 8] [--trim] [--out FILE.json]
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/stage1_heap.py   # glibc's fixed threshold

Stage 1's fsdp micro-batch step (``global_gradient._Sums.add``) on the scale
rehearsal's medium shape (56M parameters, 26k vocabulary), ranks spawned on one gloo
process group with no Ray around them, micro-batches of 2 × 256 random tokens. In each
rank a thread reads the RSS every 3 ms with the micro-batch and the moment of it then
(loading its rows, the forward, the loss and start of the backward, each decoder
layer's backward, the root unit's backward and reduce-scatter, the gradient moved into
the sums, the heap returned, between micro-batches). After each micro-batch the rank
reads glibc's heap statistics (``mallinfo2``: bytes in use, free bytes the heap keeps,
mmapped bytes) and the step's time. ``--trim`` returns the freed heap after every
micro-batch (``global_gradient._return_freed_heap``, which Stage 1 itself calls only
after the stream and before each checkpoint); the run without it is Stage 1 as it is.
Results: benchmarks/RESULTS.md, "Scale rehearsal", the medium size's fsdp peak.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scale_rehearsal import VOCAB, build_model

from dba_ray import sharding
from dba_ray.config import ModelConfig
from dba_ray.global_gradient import _return_freed_heap, _Sums
from dba_ray.memory_plan import GiB

FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


class RssTimeline:
    """RSS samples of this process, each with the micro-batch and the moment of it
    (``step``, ``now``) set then."""

    def __init__(self):
        self.step, self.now, self.samples = -1, "loading its rows", []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((rss(), self.step, self.now))
            time.sleep(0.003)

    def stop(self) -> tuple[dict[str, int], int]:
        """The highest RSS per moment (over all micro-batches), and the micro-batch of
        the highest of all."""
        self._stop.set()
        self._thread.join()
        top: dict[str, int] = {}
        for value, _, now in self.samples:
            top[now] = max(top.get(now, 0), value)
        return top, max(self.samples)[1]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def name_moments(model: torch.nn.Module, sums: _Sums, timeline: RssTimeline) -> None:
    def mark(name: str):
        return lambda *_: setattr(timeline, "now", name)

    # prepend: before FSDP's own pre-hook, whose all-gather belongs to the forward.
    model.register_forward_pre_hook(mark("forward"), prepend=True)
    model.register_forward_hook(mark("loss, start of backward"))
    for i, layer in enumerate(model.model.layers):
        layer.register_full_backward_pre_hook(mark(f"backward of layer {i}"))
    # Layer 0's backward is the last block's; the root unit's (embeddings) follows.
    model.model.layers[0].register_full_backward_hook(mark("the root unit's backward and reduce-scatter"))
    into_sums = sums._move_grads

    def move_grads(n_step: float) -> None:
        timeline.now = "gradient into the sums"
        into_sums(n_step)

    sums._move_grads = move_grads


def rank_main(rank: int, world: int, port: int, model_dir: str, steps: int, trim: bool, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    timeline = RssTimeline()
    model, _ = sharding.load_sharded(ModelConfig(name_or_path=model_dir), torch.device("cpu"), sum_gradients=True)
    model.eval()
    sums = _Sums(model, True, torch.device("cpu"), sharded=True)
    name_moments(model, sums, timeline)
    rng = np.random.default_rng(rank)
    rows = []
    for step in range(steps):
        ids = rng.integers(0, VOCAB, size=(2, 256)).astype(np.int64)
        timeline.step, start = step, time.monotonic()
        sums.add({"input_ids": ids, "labels": ids.copy()})
        if trim:
            timeline.now = "returning the heap"
            _return_freed_heap()
        seconds = time.monotonic() - start
        timeline.now = "between micro-batches"
        heap = libc.mallinfo2()
        rows.append(
            {
                "step_s": round(seconds, 3),
                "rss_gib": round(rss() / GiB, 3),
                "heap_in_use_gib": round(heap.uordblks / GiB, 3),
                "heap_free_gib": round(heap.fordblks / GiB, 3),
                "mmapped_gib": round(heap.hblkhd / GiB, 3),
            }
        )
    peaks, peak_step = timeline.stop()
    top = max(peaks, key=peaks.get)
    out[rank] = {
        "peak_gib": round(peaks[top] / GiB, 3),
        "peak_at": top,
        "peak_micro_batch": peak_step,
        "peaks_gib": {k: round(v / GiB, 3) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])},
        "micro_batches": rows,
    }
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="micro-batches per rank")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) after every micro-batch")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        build_model("medium", Path(d))
        out = manager.dict()
        mp.spawn(rank_main, args=(args.workers, free_port(), d, args.steps, args.trim, out), nprocs=args.workers)
        ranks = [out[r] for r in range(args.workers)]
    result = {
        "workers": args.workers,
        "trim": args.trim,
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "steps": args.steps,
        "ranks": ranks,
    }
    for r, rank in enumerate(result["ranks"]):
        print(f"rank {r}: peak {rank['peak_gib']} GiB ({rank['peak_at']}, micro-batch {rank['peak_micro_batch']})")
        for i, row in enumerate(rank["micro_batches"]):
            print(f"  after micro-batch {i}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
