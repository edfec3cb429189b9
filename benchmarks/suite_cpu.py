"""The test suite's wall time and CPU-seconds per test file, Ray's processes included.

    python benchmarks/suite_cpu.py --out suite_cpu.json [-- PYTEST_ARGS]
    python benchmarks/suite_cpu.py --table A.json B.json ...   # the README's table of runs

Runs pytest in this process, as `python -m pytest` does (pyproject.toml's addopts: two
pytest-xdist workers), with a thread that samples every process under it (cpu_time.py's
sampler) for the totals. Each process that runs tests (each xdist worker, or this one
with ``-- -n 0``) samples its own tree the same way and charges the CPU-seconds gained
since its last sample to the test file it is running then; per-file wall seconds are
that process's, so under xdist they add up to about twice the suite's wall time.

Every sampling process is a child subreaper, so processes whose parent died (`ray
start`'s nodes, Ray's workers after their raylet) stay in its tree; it reaps only those
adopted ones, never a child a test waits for. The whole machine's busy time (/proc/stat)
is summed over the run as a check: on an idle machine it agrees with the tree's. The
samplers' own CPU is in the tree's figure (about 1% each). A shared fixture's set-up is
charged to the file whose test first asks for it in its process (the process's Ray
cluster, the finished run several files read), so per-file figures move when the order,
the selection of files or their split between the workers changes; the totals do not.
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

INTERVAL_ENV = "SUITE_CPU_INTERVAL_S"  # how pytest-xdist's workers learn ``--interval``


def machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def become_subreaper() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


class TreeCpu:
    """A thread that samples this process's tree every ``interval`` seconds and charges
    the CPU-seconds and wall seconds gained since the last sample to ``current``."""

    def __init__(self, interval: float, current: str):
        self.interval, self.current = interval, current
        self.rows: dict[str, dict] = {}
        self.me, self.seen, self.first_parent = psutil.Process(), {}, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def row(self, name: str) -> dict:
        return self.rows.setdefault(name, {"cpu_s": 0.0, "wall_s": 0.0, "tests": 0})

    def start(self) -> None:
        become_subreaper()
        self.thread.start()

    def finish(self) -> dict[str, dict]:
        self.stop.set()
        self.thread.join()
        return {k: {m: round(v, 1) if isinstance(v, float) else v for m, v in r.items()} for k, r in self.rows.items()}

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
        last_cpu, last_wall = self._total(), time.monotonic()
        while not self.stop.wait(self.interval):
            cpu, wall = self._total(), time.monotonic()
            row = self.row(self.current)
            row["cpu_s"] += cpu - last_cpu
            row["wall_s"] += wall - last_wall
            last_cpu, last_wall = cpu, wall
            self._reap_adopted()


FILES = pytest.StashKey[dict]()


class FileCpu(TreeCpu):
    """A pytest plugin in the process that runs the tests: CPU-seconds and wall seconds
    per test file. From an xdist worker they go back with the worker's output."""

    def __init__(self, interval: float, config: pytest.Config):
        super().__init__(interval, "(start-up)")
        self.config = config

    def pytest_sessionstart(self, session):
        self.start()

    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid.split("::")[0]
        self.row(self.current)["tests"] += 1

    def pytest_sessionfinish(self, session):
        files = self.finish()
        if hasattr(self.config, "workeroutput"):
            self.config.workeroutput["suite_cpu_files"] = json.dumps(files)
        else:
            self.config.stash[FILES] = files


def pytest_configure(config: pytest.Config) -> None:
    """This module as a plugin (``-p suite_cpu``, main() below): an xdist worker samples
    its own tree."""
    if hasattr(config, "workerinput"):
        config.pluginmanager.register(FileCpu(float(os.environ[INTERVAL_ENV]), config))


class Collect:
    """The main process's plugin: per-file figures from the xdist workers, or from a
    FileCpu of its own when it runs the tests itself (``-- -n 0``)."""

    def __init__(self, interval: float):
        self.interval, self.files, self.config = interval, {}, None

    @pytest.hookimpl(trylast=True)  # after pytest-xdist has chosen whether to distribute
    def pytest_configure(self, config: pytest.Config) -> None:
        self.config = config
        if not config.pluginmanager.has_plugin("dsession"):
            config.pluginmanager.register(FileCpu(self.interval, config))

    def pytest_testnodedown(self, node, error) -> None:
        for name, row in json.loads(node.workeroutput.get("suite_cpu_files", "{}")).items():
            got = self.files.setdefault(name, {"cpu_s": 0.0, "wall_s": 0.0, "tests": 0})
            for k, v in row.items():
                got[k] = round(got[k] + v, 1) if isinstance(v, float) else got[k] + v

    def per_file(self) -> dict[str, dict]:
        return self.files or self.config.stash.get(FILES, {})


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
    os.environ[INTERVAL_ENV] = str(args.interval)
    here = str(Path(__file__).resolve().parent)  # so that xdist's workers import this module
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    totals, collect = TreeCpu(args.interval, "all"), Collect(args.interval)
    totals.start()
    start, busy = time.monotonic(), machine_busy_s()
    rc = pytest.main(["-p", "suite_cpu", *(a for a in args.pytest_args if a != "--")], plugins=[collect])
    wall, busy = time.monotonic() - start, machine_busy_s() - busy
    result = {
        "rc": int(rc),
        "wall_s": round(wall, 1),
        "cpu_s": totals.finish()["all"]["cpu_s"],
        "machine_cpu_s": round(busy, 1),
        "cores": os.cpu_count(),
        "files": dict(sorted(collect.per_file().items(), key=lambda kv: -kv[1]["cpu_s"])),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print("| file | tests | wall s | CPU-s |\n|---|---:|---:|---:|")
    for name, r in result["files"].items():
        print(f"| {name} | {r['tests']} | {r['wall_s']} | {r['cpu_s']} |")
    print(
        f"| all (the tree; the machine: {result['machine_cpu_s']} CPU-s) | | {result['wall_s']} | {result['cpu_s']} |"
    )
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
