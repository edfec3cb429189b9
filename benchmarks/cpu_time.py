"""Wall time and CPU-seconds of a command's whole process tree, Ray's processes included.

    python benchmarks/cpu_time.py [--out FILE.json] -- dba-ray run examples/quickstart.yaml

On a machine shared with other work, wall time measures the neighbours too; CPU-seconds
of the command's own processes do not. This process becomes a child subreaper (Linux
prctl), so processes that outlive their parent (Ray's workers, raylet, GCS) are handed
to it and reaped here: the kernel then counts every descendant's user + system time in
this process's RUSAGE_CHILDREN, exactly, however short-lived.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def reap_all(deadline_s: float) -> None:
    """Wait for every remaining descendant (handed to this process as orphans)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:
            time.sleep(0.2)
    print(f"cpu_time: descendants still running after {deadline_s:.0f} s, not counted", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the result as JSON here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    start = time.monotonic()
    rc = subprocess.call(cmd)
    wall = time.monotonic() - start
    reap_all(60)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "command": " ".join(cmd),
        "rc": rc,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "user_s": round(usage.ru_utime, 1),
        "system_s": round(usage.ru_stime, 1),
        "cores": os.cpu_count(),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result), file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
