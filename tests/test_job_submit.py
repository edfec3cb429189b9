"""`dba-ray run` as a `ray job submit` entrypoint, on a real Ray head started for the
test: its own temp dir, ports and token, so the session's `ray_cluster` (and any other
Ray on the machine) is neither joined nor stopped."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import make_docs, write_jsonl

from dba_ray.ray_runtime import warn_if_output_in_job_dir

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Variables that would point a child process at another cluster or token.
_FOREIGN = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_TMPDIR")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _belongs(proc: psutil.Process, session: int, temp: str) -> bool:
    """A process of this head: started by its `ray start` (same session), or a job's
    driver or worker (which run inside the head's temp dir)."""
    try:
        return os.getsid(proc.pid) == session or proc.cwd().startswith(temp) or temp in " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False


def _stop_head(session: int, temp: str) -> None:
    # Not `ray stop`: it kills every Ray process on the machine.
    procs = [p for p in psutil.process_iter() if p.pid != os.getpid() and _belongs(p, session, temp)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # gone since the listing: one fewer to stop
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


@contextmanager
def ray_head(num_cpus: int = 4):
    """`ray start --head` on 127.0.0.1 with its dashboard and token auth; yields the
    dashboard address, the environment that reaches it, and the Ray temp dir's parent."""
    # Short: Ray's Unix sockets live under the temp dir (at most 107 characters).
    base = tempfile.mkdtemp(prefix="dbaray-", dir="/tmp")
    gcs, dashboard, client, agent = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    cmd = [
        RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--num-cpus", str(num_cpus), "--temp-dir", f"{base}/ray", "--disable-usage-stats",
    ]  # fmt: skip
    # Its own session: every daemon it leaves behind can be found and stopped.
    starter = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, out[-3000:]
        yield f"http://127.0.0.1:{dashboard}", env, base
    finally:
        _stop_head(starter.pid, base)
        shutil.rmtree(base, ignore_errors=True)


def working_dir(tmp_path: Path) -> Path:
    """What a user submits: the package (a checkout of this repository), plus data
    and a config that names them by relative paths."""
    wd = tmp_path / "wd"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "dba_ray", wd / "dba_ray", ignore=skip)
    shutil.copytree(REPO / "cluster", wd / "cluster", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, wd / name)
    write_jsonl(wd / "data/gen_eval.jsonl", make_docs(2, seed=2))
    write_jsonl(wd / "data/dom.jsonl", [{"text": "def f(x):\n    return x + 1"}] * 8)
    write_jsonl(wd / "data/dom_eval.jsonl", [{"text": "def g(y):\n    return y + 1"}] * 2)
    seq = 32
    run = {
        # Shared storage of this one-machine cluster (a bucket URI on a real one).
        "output_dir": str(tmp_path / "out"),
        # Applies only to a cluster dba-ray starts itself, not to one it joins.
        "ray": {"num_cpus": 2},
        "model": {
            "name_or_path": "builtin:tiny-llama",
            "tokenizer": "builtin:bytes",
            "builtin_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 2},
        },
        "train": {"data": {"path": "data/dom.jsonl", "seq_len": seq}, "batch_size": 4, "max_steps": 2},
        "eval": {"sets": [
            {"name": "dom", "kind": "domain", "data": {"path": "data/dom_eval.jsonl", "seq_len": seq}},
            {"name": "gen", "kind": "general", "data": {"path": "data/gen_eval.jsonl", "seq_len": seq}},
        ]},
        # The job's mechanics are under test, not Stage 1: `direct` needs no ĝ_G.
        "methods": ["direct"],
    }  # fmt: skip
    (wd / "run.yaml").write_text(yaml.safe_dump(run))
    return wd


def _ray(args: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_dba_ray_on_a_cluster(tmp_path):
    wd = working_dir(tmp_path)
    with ray_head() as (address, env, base):
        job = f"dba-ray-{secrets.token_hex(4)}"
        submit = _ray(
            ["job", "submit", "--address", address, "--submission-id", job,
             "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
             "--", "dba-ray", "run", "run.yaml"],
            env, wd, timeout=720,
        )  # fmt: skip
        log = submit.stdout + submit.stderr
        status = _ray(["job", "status", "--address", address, job], env, wd, timeout=60)
        assert f"Job '{job}' succeeded" in status.stdout + status.stderr, log[-6000:]
        assert submit.returncode == 0
        # The driver joined this head (4 CPUs), ignoring ray.num_cpus.
        assert "ray.num_cpus does not apply" in log and "'CPU': 4.0" in log

        # Without RAY_ADDRESS, dba-ray on the head's machine joins what `ray start`
        # started there (here found through RAY_TMPDIR) instead of failing on num_cpus.
        probe = subprocess.run(
            [sys.executable, "-c", (
                "import ray; from dba_ray.config import RayConfig; "
                "from dba_ray.ray_runtime import ensure_ray; ensure_ray(RayConfig(num_cpus=1)); "
                "print('CPUS', ray.cluster_resources()['CPU'])"
            )],
            env={**env, "RAY_TMPDIR": base, "PYTHONPATH": str(REPO)},
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert "CPUS 4.0" in probe.stdout, probe.stderr[-3000:]

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["results"]) == {"direct"}
    assert report["results"]["direct"]["steps"] == 2
    assert 0 <= report["results"]["direct"]["S"] <= 1


def test_relative_output_dir_in_a_job_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    with caplog.at_level(logging.WARNING, logger="dba_ray"):
        warn_if_output_in_job_dir("runs/x")  # not in a job: a plain local run
        assert not caplog.records
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
        for elsewhere in (str(tmp_path.parent / "out"), "s3://bucket/runs/x"):
            warn_if_output_in_job_dir(elsewhere)
        assert not caplog.records
        warn_if_output_in_job_dir("runs/x")
    assert "uploaded working dir" in caplog.text and str(tmp_path / "runs" / "x") in caplog.text
