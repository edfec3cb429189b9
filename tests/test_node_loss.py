"""Node loss, for real: a multi-node Ray cluster on this machine (tests/multinode.py), a
worker node's raylet SIGKILLed mid-run (Stage 2) or mid-stream (Stage 1), the job going
on without it.

Drivers run as subprocesses joined to that cluster; the one-process references they
are checked against run in this process, on the session's cluster."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import make_docs, write_jsonl
from multinode import LocalCluster
from test_recovery import registered_runs
from test_stage1 import one_process_fingerprint, ordered_sequences, reference_gradients
from test_stage1 import rel_error as stage1_rel_error
from test_train import reference_weights, rel_error, saved_weights

from dba_ray import artifact
from dba_ray.config import load_config
from dba_ray.methods import config_for_run

pytestmark = pytest.mark.usefixtures("ray_cluster")

SLOT = "dba_node"  # one per worker node: a Train worker needs one, so each gets a node of its own
CURRENT = "/tmp/ray/ray_current_cluster"  # what a bare ray.init() on this machine joins


def _current_cluster() -> str | None:
    return open(CURRENT).read() if os.path.exists(CURRENT) else None


@pytest.fixture(scope="module")
def cluster():
    """A head (CPUs for drivers' helpers and Ray Data) and three worker nodes of one CPU
    and one SLOT each: two hold a 2-worker job, the third is spare."""
    before = _current_cluster()
    c = LocalCluster()
    try:
        c.start_node("head", "127.0.0.2", cpus=3)
        for i in (1, 2, 3):
            c.start_node(f"w{i}", f"127.0.0.{2 + i}", cpus=1, resources={SLOT: 1})
        yield c
    finally:
        c.stop()
    assert not c.leftovers()
    assert _current_cluster() == before  # other processes' ray.init() still find theirs


def test_the_cluster_refuses_a_driver_without_its_token(cluster):
    probe = "import ray; ray.init(); print(ray.cluster_resources())"
    # One connection attempt, not Ray's 20 (a second apart): each is refused alike.
    env = cluster.env(RAY_AUTH_TOKEN="0" * 64, RAY_gcs_server_port_wait_time_s="1")
    wrong = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "AuthenticationError" in wrong.stderr


def test_trackers_live_on_the_drivers_node(cluster):
    # A tracker holds a job's progress and Stage 1's result on its way to the driver: it
    # must not go down with a worker node. Six of them, so a placement that merely
    # prefers the driver's node (soft affinity) shows.
    probe = (
        "import ray; from dba_ray.progress import new_tracker; ray.init(); "
        "ts = [new_tracker() for _ in range(6)]; here = ray.get_runtime_context().get_node_id(); "
        "print(sorted({ray.get(t.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())) == here "
        "for t in ts}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=cluster.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[True]"


def start_driver(cluster, script: str, cfg_file, log) -> subprocess.Popen:
    args = ["-c", script, str(cfg_file)]
    return subprocess.Popen(
        [sys.executable, *args], env=cluster.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def kill_a_train_node(cluster, driver, log_path: str, ready):
    """Once ``ready()``, SIGKILL the raylet of a worker node that holds a Train worker;
    returns that node."""
    deadline = time.monotonic() + 600
    while True:
        assert driver.poll() is None, open(log_path).read()[-4000:]
        assert time.monotonic() < deadline, "the job never got to where the kill belongs"
        if ready():
            workers = [n for n in cluster.nodes[1:] if n.proc.poll() is None]
            busy = [n for n in workers if n.hosts("ray::RayTrainWorker")]
            if busy:
                # The job's Tracker (progress, and Stage 1's result on its way to the
                # driver) lives on the driver's node, the head: never on a node that can go.
                assert not any(n.hosts("ray::Tracker") for n in workers)
                cluster.kill_raylet(busy[0])
                return busy[0]
        time.sleep(0.2)


def wait(driver, log_path: str, timeout: float = 900) -> str:
    try:
        driver.wait(timeout=timeout)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = open(log_path).read()
    assert driver.returncode == 0, text[-6000:]
    return text


STAGE2_DRIVER = """
import json, logging, sys
from dataclasses import asdict
from dba_ray.config import load_config
from dba_ray.trainer import run_train
logging.basicConfig(level=logging.INFO)
print("RESULT " + json.dumps(asdict(run_train(load_config(sys.argv[1]), "direct"))))
"""


def test_stage2_survives_losing_a_node(cluster, tmp_path):
    dom = write_jsonl(tmp_path / "dom.jsonl", make_docs(60, seed=1))
    tree = {
        "output_dir": str(tmp_path / "out"),
        "ray": {"worker_resources": {SLOT: 1}},
        "train": {
            "data": {"path": dom, "seq_len": 32}, "batch_size": 2, "num_workers": 2, "max_steps": 12,
            "checkpoint_every": 2, "max_failures": 2, "progress_interval_s": 1, "schedule": {"lr": 3e-3},
        },
    }  # fmt: skip
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    log_path = str(tmp_path / "driver.log")
    with open(log_path, "w") as log:
        driver = start_driver(cluster, STAGE2_DRIVER, cfg_file, log)
    checkpoints = lambda: list((tmp_path / "out" / "ray_train").glob("train-direct-*/checkpoint_*/state.json"))  # noqa: E731
    lost = kill_a_train_node(cluster, driver, log_path, checkpoints)
    text = wait(driver, log_path)
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    assert 0 < result["resumed_at"] < 12, result  # from a checkpoint the lost node's run wrote
    assert lost.proc.poll() is not None  # the whole node went down with its raylet

    # Where one process, over the whole global batch each step, ends (test_train's
    # reference): no step lost or repeated across the lost node.
    want = reference_weights(config_for_run(load_config(str(cfg_file)), "direct"))
    assert rel_error(saved_weights(result["model_dir"]), want) <= 1e-6


def replace_lost_nodes(cluster, want: int = 3) -> None:
    """Start worker nodes until ``want`` are alive (an earlier test may have lost one)."""
    alive = [n for n in cluster.nodes[1:] if n.proc.poll() is None]
    for _ in range(want - len(alive)):
        k = len(cluster.nodes)
        cluster.start_node(f"w{k}", f"127.0.0.{2 + k}", cpus=1, resources={SLOT: 1})


STAGE1_DRIVER = """
import json, logging, sys
from dba_ray.config import load_config
from dba_ray.global_gradient import run_global_gradient
logging.basicConfig(level=logging.INFO)
print("RESULT " + json.dumps(run_global_gradient(load_config(sys.argv[1])).meta))
"""


def test_stage1_survives_losing_a_node(cluster, tmp_path):
    replace_lost_nodes(cluster)
    # ~41k tokens: after the first checkpoint (4k) the stream has ~10 s left for the kill.
    gen = write_jsonl(tmp_path / "gen.jsonl", make_docs(300, seed=3))
    out = tmp_path / "out"
    tree = {
        "output_dir": str(out),
        "ray": {"worker_resources": {SLOT: 1}},
        "stage1": {"data": {"path": gen, "seq_len": 32}, "batch_size": 2, "num_workers": 2, "max_failures": 2,
                   "parallel": "fsdp", "checkpoint_every_tokens": 4000, "progress_interval_s": 1},
    }  # fmt: skip
    cfg_file = tmp_path / "stage1.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    cfg = load_config(str(cfg_file))
    artifact_dir = out / "global_gradient"
    log_path = str(tmp_path / "driver.log")
    with open(log_path, "w") as log:
        driver = start_driver(cluster, STAGE1_DRIVER, cfg_file, log)

    def checkpointed() -> bool:  # Ray Train has registered a checkpoint of the job
        return bool(registered_runs(out / "ray_train", "stage1-*"))

    lost = kill_a_train_node(cluster, driver, log_path, checkpointed)
    assert not (artifact_dir / "meta.json").exists()  # the artifact is written only at the end
    text = wait(driver, log_path)
    meta = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    assert lost.proc.poll() is not None
    assert 4000 <= meta["resumed_at_tokens"] < meta["tokens"]  # from a checkpoint, not the start

    # Against one process over the same rows: every row counted once, not once per attempt
    # nor twice across the checkpoint (the token-weighted mean does not depend on the
    # batch size; 64 is quicker).
    ids, labels = ordered_sequences(cfg)
    ref_mean, _, ref_tokens = reference_gradients(cfg.model, ids, labels, 64)
    assert meta["tokens"] == ref_tokens and meta["sequences"] == len(ids)
    assert meta["data"]["fingerprint"] == one_process_fingerprint(ids, labels)
    got = artifact.load(str(artifact_dir))
    assert stage1_rel_error(got.mean, ref_mean) <= 1e-6
