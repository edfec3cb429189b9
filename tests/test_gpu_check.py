"""benchmarks/gpu_check.sh runs on CPU with a tiny model: every part of the GPU check
(Stage 1, the DBA and fisher steps, the Stage 2 loop, an FSDP run) works before a GPU
is at hand. Each part starts its own Ray cluster, as on a GPU machine."""

import json
import math
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["size"] == "tiny"
    for part in ("stage1", "dba_step", "fisher_step", "stage2", "fsdp"):
        assert "error" not in res[part], (part, res[part])
    for part, key in [
        ("stage1", "ratio"),
        ("dba_step", "time_ratio"),
        ("fisher_step", "time_ratio"),
        ("stage2", "ratio"),
    ]:
        assert 0 < res[part][key] < math.inf, (part, res[part])
    # Real peaks of both sides (a tiny model's difference is within allocator noise).
    for part in ("dba_step", "fisher_step"):
        assert res[part]["peak_plain_bytes"] > 0 and math.isfinite(res[part]["extra_bytes_per_param"])
    assert (
        0 < res["stage2"]["plain_mfu_of_measured_matmul"] and res["stage2"]["checkpoint_fraction_of_step"] is not None
    )
    assert res["fsdp"]["ok"] and 0 <= res["fsdp"]["S"] <= 1
    # The table a reader gets, one line per figure.
    assert "| Stage 2 loop / plain loop (steps/s) |" in proc.stdout and "failed" not in proc.stdout
