"""Progress of long Ray jobs, shown on the driver.

Workers push counts to a small ``Tracker`` actor without waiting; a thread on the
driver polls it and prints one line every few seconds. The actor also carries
skipped-record counts from Ray Data tasks and hands results back to the driver.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger("dba_ray")


@ray.remote(num_cpus=0)
class Tracker:
    def __init__(self):
        self.counts: dict[str, float] = {}
        self.skipped = 0
        self.skipped_in: dict[str, int] = {}  # by file: a file read again is not counted again
        self.first_skip: str | None = None
        self.results: dict[str, Any] = {}

    def add(self, **deltas: float) -> None:
        for k, v in deltas.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def set(self, **values: float) -> None:
        self.counts.update(values)

    def add_skipped(self, n: int, first: str | None, key: str | None = None) -> None:
        """``n`` more malformed records; those of a whole file ``key`` replace its count,
        as a job retried after a lost worker reads its files again."""
        if key is None:
            self.skipped += n
        else:
            self.skipped_in[key] = n
        self.first_skip = self.first_skip or first

    def snapshot(self) -> dict:
        skipped = self.skipped + sum(self.skipped_in.values())
        return {**self.counts, "skipped": skipped, "first_skip": self.first_skip}

    def set_result(self, key: str, value: Any) -> None:
        self.results[key] = value

    def take_result(self, key: str) -> Any:
        # Returned through this call, the value is owned by the caller (the driver),
        # so it outlives this actor and the workers that produced it.
        return self.results.pop(key, None)


def new_tracker(name: str | None = None):
    """A Tracker on the driver's node: it holds the job's result, so it must not go
    down with a worker node (the driver's node going down ends the command anyway).
    Hard affinity: with soft affinity Ray 2.60 placed this zero-CPU actor on worker
    nodes (tests/test_node_loss.py saw it lost with one). ``name``: a named actor, which
    another process of the job can find (a sweep's driver reads its trials' progress)."""
    here = ray.get_runtime_context().get_node_id()
    placed = NodeAffinitySchedulingStrategy(here, soft=False)
    return Tracker.options(name=name, get_if_exists=name is not None, scheduling_strategy=placed).remote()


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(
    label: str,
    done: float,
    total: float | None,
    rate: float | None,
    unit: str = "tokens",
    loss: float | None = None,
) -> str:
    """e.g. ``stage1: 1.20M/2.00M tokens (60%), 12.3k tokens/s, ETA 1m05s``; ``rate``
    None (the first line) shows no speed yet."""
    parts = [f"{label}: {_human(done)}" + (f"/{_human(total)}" if total else "") + f" {unit}"]
    if total:
        parts[0] += f" ({min(100.0, 100.0 * done / total):.0f}%)"
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if rate is not None:
        parts.append(f"{_human(rate) if rate >= 10 else f'{rate:.2f}'} {unit}/s")
        if total:
            parts.append("ETA " + (_duration((total - done) / rate) if rate > 0 else "?"))
    return ", ".join(parts)


class ProgressLines:
    """Progress lines from successive snapshots of one Tracker, with rates since work
    began, so that start-up time does not dilute the ETA."""

    def __init__(self, label: str, total: float | None, unit: str = "tokens"):
        self.label, self.total, self.unit = label, total, unit
        self._first: tuple[float, float, float] | None = None  # (time, done, tokens) at first
        self._shown = 0.0

    def next(self, snap: dict, now: float) -> str | None:
        """The line for ``snap`` (taken at ``now``); None before work began or when
        nothing changed since the last line."""
        done = snap.get(self.unit, 0)
        if not done or done == self._shown:
            return None
        self._shown = done
        tokens = snap.get("tokens", 0)
        if self._first is None:
            self._first = (now, done, tokens)
        elapsed = now - self._first[0]
        rate = (done - self._first[1]) / elapsed if elapsed > 0 else None
        line = progress_line(self.label, done, self.total, rate, self.unit, snap.get("loss"))
        if self.unit != "tokens" and rate is not None:
            line += f", {_human((tokens - self._first[2]) / elapsed)} tokens/s"
        return line


class ProgressPrinter:
    """Context manager: print a progress line every ``interval`` seconds."""

    def __init__(self, tracker, label: str, total: float | None, interval: float, unit: str = "tokens"):
        self.tracker, self.interval = tracker, interval
        self.lines = ProgressLines(label, total, unit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._report()

    def _report(self) -> None:
        try:
            snap = ray.get(self.tracker.snapshot.remote(), timeout=30)
        except Exception:  # a slow poll must never kill the job it watches
            return
        line = self.lines.next(snap, time.monotonic())
        if line:
            log.info(line)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if exc[0] is None:
            self._report()  # the final count, however short the job was
