"""The pipeline at the sizes users run, on CPU: per-worker peak memory of every phase,
sampled from every Ray worker process, against what ``dba-ray plan`` predicts for the
same config.

The models are shaped like Qwen2.5-0.5B (hidden 896, 24 layers, 14 query / 2 key-value
heads, intermediate 4864, tied embeddings) with a 26k-token vocabulary, random weights,
saved with ``save_pretrained`` (the byte tokenizer beside them: which ids the text uses
does not change what a step holds), and two smaller sizes of the same shape. Each size
runs, as a user would, each command in its own process and Ray cluster:

- ``dba-ray global-gradient`` (``second_moment: true``) under ``stage1.parallel`` ddp
  at 2 workers and fsdp at 2 and 3 workers;
- ``dba-ray run`` with one method, ``dba`` with the fisher anchor, under FSDP at 2
  workers on the 2-worker fsdp artifact (so Stage 1 is not run again), then its
  evaluation, a linear merge of two knobs chosen on validation sets, and its export.

A sampler reads the RSS of every ``ray::`` process every ``--interval`` seconds and keeps
each process's peak per process title, which tells the phases apart: Train workers
(Stage 1, Stage 2 and its export), ``_evaluate_remote`` (evaluation), ``_score_curve``
and ``_export_merge`` (the merge). Each phase's measured per-worker peak is set beside
the plan's (``dba_ray.preflight.memory_phases``, what ``dba-ray plan`` prints).

    python benchmarks/scale_rehearsal.py --sizes small,medium --out small-medium.json
    python benchmarks/scale_rehearsal.py --sizes full --ddp-workers 1 --out full.json
    python benchmarks/scale_rehearsal.py --replan full.json   # the plan as the code now makes it

Memory, not throughput, is the point: few tokens and steps. The full size's ddp Stage 1
worker peaks at 11 GiB (two of them do not fit a 24 GB machine: ``--ddp-workers 1``, for
which the plan gives the same per-worker peak, or ``--skip full:stage1-ddp-2``).
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
from typing import NamedTuple

import psutil
import yaml
from common import emit, write_text
from transformers import Qwen2Config, Qwen2ForCausalLM

from dba_ray.config import load_config
from dba_ray.memory_plan import GiB
from dba_ray.preflight import memory_phases
from dba_ray.tokenizer import byte_tokenizer

# (hidden, layers, intermediate, query heads, key-value heads)
SIZES = {
    "small": (224, 6, 1216, 7, 1),
    "medium": (448, 12, 2432, 7, 1),
    "full": (896, 24, 4864, 14, 2),
}
VOCAB = 26_000
# (stage1.parallel, workers) of the Stage 1 runs (ddp's workers: --ddp-workers); Stage 2
# reads the artifact of STAGE2_ARTIFACT's run.
STAGE1_RUNS = [("ddp", 2), ("fsdp", 2), ("fsdp", 3)]
STAGE2_ARTIFACT = "stage1-fsdp-2"
# The run's phases: the plan's phase name and the process titles measured for it.
RUN_PHASES = [
    ("stage 2 dba", ("TrainWorker",)),
    ("evaluation", ("_evaluate_remote",)),
    ("merge", ("_score_curve", "_export_merge")),
]


def qwen_config(size: str) -> Qwen2Config:
    hidden, layers, inter, heads, kv = SIZES[size]
    tok = byte_tokenizer()
    return Qwen2Config(
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


def build_model(size: str, folder: Path) -> int:
    """Save a random Qwen2-shaped model of ``size`` in ``folder``; its parameter count."""
    model = Qwen2ForCausalLM(qwen_config(size))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


class Peak(NamedTuple):
    """A process's RSS at a sample (compared by ``rss`` first), the shared pages in it,
    and the process's age then."""

    rss: int
    shared: int
    at_s: float


class Sampler:
    """Peak RSS of every ``ray::`` process under ``root`` (the command's process: its
    embedded Ray cluster's workers descend from it, other sessions' do not), by (pid,
    process title): a Ray worker process that runs one task after another is counted
    under each task's title."""

    def __init__(self, root: int, interval: float):
        self.root, self.interval, self.peaks, self.seen = psutil.Process(root), interval, {}, {}
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
            try:
                processes = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in processes:
                try:
                    title, mem, born = " ".join(proc.cmdline()), proc.memory_info(), proc.create_time()
                except psutil.Error:  # ended since it was listed
                    continue
                if title.startswith("ray::"):
                    key, now = (proc.pid, title), time.monotonic()
                    # With the peak: how much of it is shared pages (files read through
                    # mmap, Ray's object store), and when, from the process's start.
                    at = Peak(mem.rss, mem.shared, time.time() - born)
                    self.peaks[key] = max(self.peaks.get(key, at), at)
                    self.seen[key] = (self.seen.get(key, (now,))[0], now)
            self._stop.wait(self.interval)

    def peaks_of(self, titles: tuple[str, ...]) -> list[Peak]:
        """Each process's peak over the titles that contain one of ``titles``, largest first."""
        by_pid: dict[int, Peak] = {}
        for (pid, title), peak in self.peaks.items():
            if any(t in title for t in titles):
                by_pid[pid] = max(by_pid.get(pid, peak), peak)
        return sorted(by_pid.values(), reverse=True)

    def span(self, titles: tuple[str, ...]) -> float:
        """Seconds from the first to the last sample of a process under ``titles``."""
        times = [t for key, seen in self.seen.items() if any(n in key[1] for n in titles) for t in seen]
        return max(times) - min(times) if times else 0.0


def run_command(command: str, cfg: dict, work: Path, interval: float) -> tuple[Sampler, float]:
    """``dba-ray COMMAND`` on ``cfg`` (written to ``work``), sampled; its wall time."""
    path = work / f"{command}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    log = (work / f"{command}.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "dba_ray", command, str(path)], stdout=log, stderr=log)
    with Sampler(proc.pid, interval) as sampler:
        proc.wait()
    if proc.returncode != 0:
        log.seek(0)
        raise SystemExit(f"dba-ray {command} ({work.name}) failed:\n{log.read()[-3000:]}")
    return sampler, time.monotonic() - start


def planned(cfg: dict, work: Path, command: str) -> dict[str, int]:
    """The plan's per-process peak (RSS on CPU) of each phase ``command`` runs for ``cfg``."""
    path = work / f"{command}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _, plan = memory_phases(load_config(str(path)), command)
    return {p.name: p.peak().device for p in plan}


def row(size: str, params: int, phase: str, workers: int, peaks: list[Peak], plan: int, wall_s: float) -> dict:
    measured = max(p.rss for p in peaks)
    return {
        "size": size,
        "parameters": params,
        "phase": phase,
        "workers": workers,
        "measured_gib": [round(p.rss / GiB, 3) for p in peaks],
        "shared_at_peak_gib": [round(p.shared / GiB, 3) for p in peaks],
        "peak_at_s": [round(p.at_s, 1) for p in peaks],
        "planned_gib": round(plan / GiB, 3),
        "measured_over_planned": round(measured / plan, 3),
        "bytes_per_param": round(measured / params, 1),
        "wall_s": round(wall_s, 1),
    }


def stage1_config(model_dir: Path, data: str, mode: str, workers: int, work: Path) -> dict:
    return {
        "output_dir": str(work / "out"),
        "model": {"name_or_path": str(model_dir)},
        "ray": {"num_cpus": workers + 2},
        "stage1": {
            "data": {"path": data, "seq_len": 256},
            "max_tokens": 2048,
            "batch_size": 2,
            "num_workers": workers,
            "parallel": mode,
            "second_moment": True,
            "output": str(work / "gg"),
        },
    }


def run_config(model_dir: Path, general: str, domain: str, artifact: Path, work: Path) -> dict:
    """One method (dba, fisher anchor) under FSDP at 2 workers, two merge knobs chosen on
    validation sets, and the export: the cheapest ``run`` that holds every phase."""
    text = {"seq_len": 128}
    return {
        "output_dir": str(work / "out"),
        "model": {"name_or_path": str(model_dir)},
        "ray": {"num_cpus": 4},
        "train": {
            "data": {"path": domain, "subset": "train", **text},
            "global_gradient": str(artifact),
            "num_workers": 2,
            "parallel": "fsdp",
            "batch_size": 2,
            "max_steps": 2,
            "dba": {"anchor": "fisher"},
        },
        "eval": {
            "max_sequences": 8,
            "batch_size": 2,
            "sets": [
                {"name": "dom", "kind": "domain", "data": {"path": domain, **text}},
                {"name": "gen", "kind": "general", "data": {"path": general, **text}},
            ],
            "validation_sets": [
                {"name": "dom-val", "kind": "domain", "data": {"path": domain, "subset": "validation", **text}},
                {"name": "gen-val", "kind": "general", "data": {"path": general, "subset": "validation", **text}},
            ],
        },
        "merge": {"mode": "linear", "knobs": [0.5, 1.0]},
        "methods": ["dba"],
    }


def rehearse(size: str, tmp: Path, general: str, domain: str, args) -> list[dict]:
    """Every run of one size (those named in ``args.skip`` left out); one row per phase."""
    model_dir = tmp / size
    params = build_model(size, model_dir)
    rows = []
    for mode, workers in STAGE1_RUNS:
        workers = args.ddp_workers if mode == "ddp" else workers
        name = f"stage1-{mode}-{workers}"
        work = tmp / f"{size}-{name}"
        work.mkdir()
        cfg = stage1_config(model_dir, general, mode, workers, work)
        plan = planned(cfg, work, "global-gradient")["stage 1"]
        if f"{size}:{name}" in args.skip:
            rows.append({"size": size, "phase": name, "workers": workers, "planned_gib": round(plan / GiB, 3)})
            continue
        sampler, wall = run_command("global-gradient", cfg, work, args.interval)
        rows.append(row(size, params, name, workers, sampler.peaks_of(("TrainWorker",))[:workers], plan, wall))
        print(json.dumps(rows[-1]), flush=True)
    if f"{size}:run" in args.skip:
        return rows
    work = tmp / f"{size}-run"
    work.mkdir()
    cfg = run_config(model_dir, general, domain, tmp / f"{size}-{STAGE2_ARTIFACT}" / "gg", work)
    plan = planned(cfg, work, "run")
    sampler, wall = run_command("run", cfg, work, args.interval)
    for phase, titles in RUN_PHASES:
        workers = 2 if phase.startswith("stage 2") else 1
        peaks = sampler.peaks_of(titles)[:workers]
        rows.append(row(size, params, phase, workers, peaks, plan[phase], sampler.span(titles)))
        print(json.dumps(rows[-1]), flush=True)
    rows.append({"size": size, "phase": "dba-ray run, whole", "wall_s": round(wall, 1)})
    return rows


def replan(path: str) -> None:
    """Rewrite the planned peaks and ratios of a results file with the plan as the code
    now makes it: a fix to the plan is checked against the runs already made."""
    result = json.loads(Path(path).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for r in (r for r in result["runs"] if "planned_gib" in r):
            model_dir, work = Path(tmp) / r["size"], Path(tmp) / f"{r['size']}-{r['phase']}"
            if not model_dir.exists():  # the config alone: all the plan reads
                qwen_config(r["size"]).save_pretrained(model_dir)
                byte_tokenizer().save_pretrained(model_dir)
            work.mkdir()
            if r["phase"].startswith("stage1-"):
                mode = r["phase"].split("-")[1]
                cfg = stage1_config(model_dir, "general.jsonl", mode, r["workers"], work)
                plan = planned(cfg, work, "global-gradient")["stage 1"]
            else:
                cfg = run_config(model_dir, "general.jsonl", "domain.jsonl", work / "gg", work)
                plan = planned(cfg, work, "run")[r["phase"]]
            r["planned_gib"] = round(plan / GiB, 3)
            if "measured_gib" in r:
                r["measured_over_planned"] = round(max(r["measured_gib"]) * GiB / plan, 3)
    emit(result, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small", help="comma-separated: " + ", ".join(SIZES))
    ap.add_argument(
        "--skip",
        default="",
        help="SIZE:RUN,... runs not to start, e.g. full:stage1-ddp-2 or full:run (which reads stage1-fsdp-2's artifact)",
    )
    ap.add_argument("--ddp-workers", type=int, default=2, help="workers of the ddp Stage 1 run (1: what fits)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    ap.add_argument("--out", default=None)
    ap.add_argument("--replan", metavar="JSON", help="only rewrite the planned peaks of this results file")
    args = ap.parse_args()
    if args.replan:
        return replan(args.replan)
    args.skip = set(filter(None, args.skip.split(",")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        general = write_text(Path(tmp) / "general.jsonl", 400)
        domain = write_text(Path(tmp) / "domain.jsonl", 200)
        for size in args.sizes.split(","):
            rows += rehearse(size, Path(tmp), general, domain, args)
    machine = f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / GiB:.1f} GiB"
    emit({"machine": machine, "date": time.strftime("%Y-%m-%d"), "runs": rows}, args.out)


if __name__ == "__main__":
    main()
