"""Wall time and CPU-seconds of a command's whole process tree, Ray's processes included.

    python benchmarks/cpu_time.py [--out FILE.json] -- dba-ray run examples/quickstart.yaml

On a machine shared with other work, wall time measures the neighbours too; CPU-seconds
of the command's own processes do not. The kernel's RUSAGE_CHILDREN cannot be used:
it counts a descendant only if every process between it and us waited for it, and Ray's
workers are not waited for that way (it measured 160 CPU-s for a run of ~1,000). So
every ``--interval`` seconds this samples user + system time of each process in the
tree (psutil) and sums each process's last sample. This process is a child subreaper
(Linux prctl), so processes whose parent died (Ray's workers, when their raylet goes)
stay in its tree. Not counted: processes that live shorter than one interval, and the
last interval of each process's life (small against minutes of Ray processes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def sample(me: psutil.Process, seen: dict) -> int:
    """Record the CPU time of every process under ``me``; returns how many there are."""
    children = me.children(recursive=True)
    for p in children:
        try:
            with p.oneshot():
                t = p.cpu_times()
                seen[(p.pid, p.create_time())] = t.user + t.system
        except psutil.Error:  # it just exited
            pass
    return len(children)


def reap() -> None:
    """Wait for every exited child (orphans handed to this process included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the result as JSON here")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    me, seen = psutil.Process(), {}
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        sample(me, seen)
        time.sleep(args.interval)
    wall = time.monotonic() - start
    deadline = time.monotonic() + 60  # what the command left behind, as it stops
    while sample(me, seen) and time.monotonic() < deadline:
        reap()
        time.sleep(args.interval)
    result = {
        "command": " ".join(cmd),
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "cpu_s": round(sum(seen.values()), 1),
        "processes": len(seen),
        "cores": os.cpu_count(),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result), file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
