"""benchmarks/gpu_check.sh runs on CPU with a tiny model: the parts of the GPU check
(Stage 1, the DBA and fisher steps, the Stage 2 loop) work before a GPU is at hand, and
the FSDP part's config is valid. Its Ray parts join the session's cluster (on a GPU
machine each starts its own). The FSDP part itself is a plain `dba-ray run` under FSDP (test_fsdp,
test_train and test_run cover those paths); running it here would cost 1.5 minutes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import ray
import yaml

from dba_ray.config import Config

ROOT = Path(__file__).resolve().parent.parent


def test_fsdp_part_config_is_valid(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check import SIZES, fsdp_config
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for size, gpu in [("tiny", False), ("full", True)]:
        (tmp_path / size).mkdir()
        path = fsdp_config(tmp_path / size, str(tmp_path / "text.jsonl"), SIZES[size]["fsdp"], gpu)
        cfg = Config.model_validate(yaml.safe_load(path.read_text()))
        assert cfg.stage1.parallel == "fsdp" and cfg.stage1.second_moment
        assert cfg.train.parallel == "fsdp" and cfg.train.use_gpu is gpu and [m.name for m in cfg.methods] == ["dba"]


def test_gpu_check_dry_run_on_cpu(tmp_path, ray_cluster):
    out = tmp_path / "gpu_check.json"
    # Its Ray parts join the session's cluster: two clusters fewer to start and stop.
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--cpu",
            "--tiny",
            "--skip",
            "fsdp",
            "--out",
            str(out),
            "--address",
            address,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["size"] == "tiny"
    for part in ("stage1", "dba_step", "fisher_step", "stage2"):
        assert "error" not in res[part], (part, res[part])
    assert res["fsdp"] == {"skipped": True}
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
    # The table a reader gets, one line per figure.
    assert "| Stage 2 loop / plain loop (steps/s) |" in proc.stdout and "failed" not in proc.stdout
    assert "| FSDP run, 1 worker | skipped |" in proc.stdout
