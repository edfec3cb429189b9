"""The test suite's wall time and CPU-seconds per test file, Ray's processes included.

    python benchmarks/suite_cpu.py --out suite_cpu.json [-- PYTEST_ARGS]
    python benchmarks/suite_cpu.py --table A.json B.json ...   # the README's table of runs

Runs pytest in this process, as `python -m pytest` does, with a thread that samples
every process under it (cpu_time.py's sampler) and charges the CPU-seconds gained since
the last sample to the test file running then. This process is a child subreaper, so
processes whose parent died (`ray start`'s nodes, Ray's workers after their raylet) stay
in the tree; it reaps only those adopted ones, never a child a test waits for. The whole
machine's busy time (/proc/stat) is charged the same way, as a check: on an idle machine
the two agree. The sampler's own CPU is in the tree's figure (about 1%). A shared
fixture's set-up is charged to the file whose test first asks for it (the session's Ray
cluster, the finished run several files read), so per-file figures move when the order
or the selection of files changes; the totals do not.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from cpu_time import PR_SET_CHILD_SUBREAPER, sample


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class FileCpu:
    """A pytest plugin: CPU-seconds and wall seconds per test file."""

    def __init__(self, interval: float):
        self.interval, self.current = interval, "(start-up)"
        self.files: dict[str, dict] = {}
        self.me, self.seen, self.first_parent = psutil.Process(), {}, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def pytest_sessionstart(self, session):
        self.thread.start()

    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid.split("::")[0]
        self.files.setdefault(self.current, {"cpu_s": 0.0, "machine_cpu_s": 0.0, "wall_s": 0.0, "tests": 0})
        self.files[self.current]["tests"] += 1

    def pytest_sessionfinish(self, session):
        self.stop.set()
        self.thread.join()

    def _total(self) -> float:
        sample(self.me, self.seen)
        t = self.me.cpu_times()
        return sum(self.seen.values()) + t.user + t.system

    def _reap_adopted(self) -> None:
        """Reap zombies that became our children when their parent died. Each process's
        parent is noted when it is first seen (keyed by pid and start time, so a reused
        pid is a new process); one first seen as our own child is pytest's (subprocess
        waits for it) and is never reaped here, nor is anything not seen before."""
        for p in self.me.children(recursive=True):
            try:
                key, parent, zombie = (p.pid, p.create_time()), p.ppid(), p.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                continue
            first = self.first_parent.setdefault(key, parent)
            if zombie and parent == self.me.pid and first != self.me.pid:
                try:
                    os.waitpid(p.pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def _loop(self) -> None:
        last_cpu, last_busy, last_wall = self._total(), machine_busy_s(), time.monotonic()
        while not self.stop.wait(self.interval):
            cpu, busy, wall = self._total(), machine_busy_s(), time.monotonic()
            row = self.files.setdefault(self.current, {"cpu_s": 0.0, "machine_cpu_s": 0.0, "wall_s": 0.0, "tests": 0})
            row["cpu_s"] += cpu - last_cpu
            row["machine_cpu_s"] += busy - last_busy
            row["wall_s"] += wall - last_wall
            last_cpu, last_busy, last_wall = cpu, busy, wall
            self._reap_adopted()


def table(paths: list[str]) -> str:
    """Runs side by side: per file, its tests in the last run, and wall seconds and
    CPU-seconds (the tree's) of each run, in the first run's order (most CPU first)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    head = " | ".join(f"{Path(p).stem} wall s | CPU-s" for p in paths)
    lines = [f"| file | tests | {head} |", "|---|---:|" + "---:|---:|" * len(runs)]
    for name, first in runs[0]["files"].items():
        if name.startswith("("):
            continue
        cells = " | ".join(
            f"{r['files'].get(name, {}).get('wall_s', '')} | {r['files'].get(name, {}).get('cpu_s', '')}" for r in runs
        )
        lines.append(f"| {name.removeprefix('tests/')} | {runs[-1]['files'].get(name, first)['tests']} | {cells} |")
    lines.append("| all | | " + " | ".join(f"{r['wall_s']} | {r['cpu_s']}" for r in runs) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print runs' figures side by side, run nothing")
    ap.add_argument("--out", type=Path, help="the per-file figures, as JSON")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest's arguments")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    if args.out is None:
        ap.error("--out is required to run the suite")
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    plugin = FileCpu(args.interval)
    start = time.monotonic()
    rc = pytest.main([a for a in args.pytest_args if a != "--"], plugins=[plugin])
    files = {
        k: {m: round(v, 1) if isinstance(v, float) else v for m, v in row.items()} for k, row in plugin.files.items()
    }
    result = {
        "rc": int(rc),
        "wall_s": round(time.monotonic() - start, 1),
        "cpu_s": round(sum(r["cpu_s"] for r in plugin.files.values()), 1),
        "machine_cpu_s": round(sum(r["machine_cpu_s"] for r in plugin.files.values()), 1),
        "cores": os.cpu_count(),
        "files": dict(sorted(files.items(), key=lambda kv: -kv[1]["cpu_s"])),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print("| file | tests | wall s | CPU-s (tree) | CPU-s (machine) |\n|---|---:|---:|---:|---:|")
    for name, r in result["files"].items():
        print(f"| {name} | {r['tests']} | {r['wall_s']} | {r['cpu_s']} | {r['machine_cpu_s']} |")
    print(f"| all | | {result['wall_s']} | {result['cpu_s']} | {result['machine_cpu_s']} |")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
