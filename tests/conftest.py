"""Shared fixtures: one real local Ray cluster for the whole session, offline hubs, a
real S3 API (the moto server on 127.0.0.1) for the tests that ask for one, and one
finished `dba-ray run` whose base model and ĝ_G the tests that only consume them share."""

from __future__ import annotations

import json
import logging
import os

# No hub access in tests: anything that tries to download fails loudly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default; on runs of a few
# steps that wait is much of a test's time. The local cluster's processes inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Every Train run starts a preemption-watcher actor (one more process importing Ray
# Train, about 4 CPU-seconds on these 2 cores); no test drains a node.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Every Ray process records metrics for a Prometheus no test runs: 6% of test_stage1.py's
# CPU-seconds (198 -> 187). Processes of every cluster a test starts inherit it.
os.environ.setdefault("RAY_enable_metrics_collection", "0")

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

# One root log handler for the whole session, on the real stderr: `dba-ray`'s main()
# calls logging.basicConfig, which would otherwise bind its handler to the captured
# stream of whichever test calls it first, closed by the time later tests log to it.
logging.basicConfig(level=logging.INFO, stream=sys.__stderr__, format="%(asctime)s dba-ray: %(message)s")

import pytest  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402

from dba_ray import console  # noqa: E402
from dba_ray.config import Config, ModelConfig  # noqa: E402
from dba_ray.model import load_model  # noqa: E402
from dba_ray.tokenizer import load_tokenizer  # noqa: E402
from dba_ray.trainer import FAULTS_ENV  # noqa: E402

# More logical CPUs than the 2 cores of CI: Train workers and Ray Data both get some.
NUM_CPUS = 6

# Failure injection (read in dba_ray/trainer.py): every Ray worker of the session, and
# every process a test starts, has DBA_RAY_FAULTS naming this file, which exists only
# inside ``fail_once_at_step``.
FAULTS_FILE = os.path.join(tempfile.gettempdir(), f"dba-ray-faults-{os.getpid()}.json")
os.environ[FAULTS_ENV] = FAULTS_FILE


@contextmanager
def fail_once_at_step(step: int):
    """Inside: rank 1 (or 0, with one worker) of every Stage 2 run raises once at
    ``step``, after that step's report and checkpoint; a ``failed_once`` marker in the
    run's folder keeps it to once per run, also across the run's restarts."""
    with open(FAULTS_FILE, "w") as f:
        json.dump({"fail_once_at_step": step}, f)
    try:
        yield
    finally:
        os.remove(FAULTS_FILE)


# Modules every spawned rank of the gloo tests imports (test_stage1_sums and others):
# imported once by a forkserver and forked from there, instead of once per rank (about
# 9 CPU-seconds each on these 2 cores).
RANK_PRELOAD = ["torch", "torch.distributed", "transformers", "dba_ray.global_gradient", "dba_ray.sharding"]


def spawn_ranks(fn, args: tuple, world: int) -> None:
    """``fn(rank, *args)`` in ``world`` processes (as ``torch.multiprocessing.spawn``),
    forked from a forkserver that has already imported ``RANK_PRELOAD``."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(RANK_PRELOAD)  # read when the server starts
    mp.start_processes(fn, args=args, nprocs=world, join=True, start_method="forkserver")


@pytest.fixture(scope="session")
def s3_env():
    """A moto S3 server on 127.0.0.1 (a free port), and the environment that points
    pyarrow at it; set in this process and returned for Ray workers."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(request):
    # Workers of this session must see the S3 settings if any collected test uses them,
    # and the failure-injection variable.
    # They go in the job's runtime_env, which Ray applies to every worker it starts for
    # this driver, however the cluster was started: inheriting the driver's environment
    # would only hold for a cluster this process starts after the variables are set.
    wants_s3 = any("s3_env" in item.fixturenames for item in request.session.items)
    env = request.getfixturevalue("s3_env") if wants_s3 else {}
    ray.init(
        num_cpus=NUM_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {**env, FAULTS_ENV: FAULTS_FILE}},
    )
    yield
    ray.shutdown()


def write_jsonl(path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def dba_ray_console(args: list[str], cwd) -> str:
    """The whole console (stdout and stderr, interleaved) of ``dba-ray ARGS``, run as a
    user runs it: a subprocess on a cluster of its own."""
    # A user's shell: no address to join, no auth mode chosen (this session's cluster
    # set RAY_AUTH_MODE in this process when it started), none of the quiet switches
    # (tests that call main() in this process set them here).
    drop = {"RAY_ADDRESS", "RAY_AUTH_MODE", *console.QUIET_ENV}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    done = subprocess.run(
        [sys.executable, "-m", "dba_ray", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout
    return done.stdout


# Ray's one warning at the start of a cluster it starts, shaped (console_shape).
AUTH_WARNING = (
    "#-#-# #:#:#,#\tWARNING authentication_token_setup.py:# -- Token authentication is enabled for this "
    "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. For more information, see "
    "https://docs.ray.io/en/latest/ray-security/token-auth.html"
)


def console_shape(console: str, out: str) -> list[str]:
    """The console's lines with numbers as # and the output folder as OUT, less the
    mutex debugging line Ray's core (absl) prints now and then under load."""
    shaped = [re.sub(r"\d+", "#", line.replace(out, "OUT")) for line in console.splitlines()]
    return [line for line in shaped if "[mutex.cc : #] RAW:" not in line]


def save_builtin_base(path, **builtin_config) -> str:
    """The builtin tiny model (``builtin_config`` changing its shape) and its tokenizer
    saved as a model directory: Ray workers load it with from_pretrained, as they would
    a user's model."""
    load_model(ModelConfig(builtin_config=builtin_config)).save_pretrained(path)
    load_tokenizer(ModelConfig()).save_pretrained(path)
    return str(path)


WORDS = (
    "the model reads general text and learns which word tends to follow which; "
    "a domain corpus shifts those statistics toward its own vocabulary"
).split()


def make_docs(n: int, seed: int = 0) -> list[dict]:
    """Deterministic small English-like documents of varying length."""
    import random

    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))} for _ in range(n)]


def tiny_config(tmp_path, data_path: str | None, **stage1) -> Config:
    """A Stage 1 config for the builtin tiny model; extra keys go to `stage1`.
    ``data_path=None`` leaves ``stage1.data`` unset (for a caller-built Dataset)."""
    data = {"data": {"path": data_path, "seq_len": 32, **stage1.pop("data", {})}}
    tree = {
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": "builtin:tiny-llama"},
        "stage1": {
            **(data if data_path is not None else {}),
            "batch_size": 4,
            "num_workers": 1,
            "progress_interval_s": 1,
            **stage1,
        },
    }
    return Config.model_validate(tree)


def write_run_config(tmp_path, out: str, base: "FinishedRun | None" = None, **sections) -> str:
    """The two-method `run` of ``finished_run`` (pretraining, Stage 1, dba and direct,
    evaluation), its output in ``tmp_path/out``; with ``base``, on that finished run's
    pretrained model and ĝ_G. ``sections``: more top-level sections."""
    gen = write_jsonl(tmp_path / "gen.jsonl", make_docs(40, seed=0))
    gen_eval = write_jsonl(tmp_path / "gen_eval.jsonl", make_docs(6, seed=2))
    dom = write_jsonl(tmp_path / "dom.jsonl", [{"text": f"def f{i}(x):\n    return x + {i}"} for i in range(40)])
    dom_eval = write_jsonl(tmp_path / "dom_eval.jsonl", [{"text": "def g(y):\n    return y + 1"}] * 4)
    mc = write_jsonl(
        tmp_path / "mc.jsonl",
        [{"question": "def f(x): return", "choices": ["x + 1", "the cat"], "answer": 0}] * 3,
    )
    tree = {
        "output_dir": str(tmp_path / out),
        # Enough pretraining that the base knows its general text (test_merge's direct
        # run must forget some); v_G for test_merge's fisher merge.
        "pretrain": {"data": {"path": gen, "seq_len": 32}, "max_steps": 30, "batch_size": 8, "checkpoint_every": 10},
        "stage1": {"data": {"path": gen, "seq_len": 32}, "batch_size": 8, "second_moment": True},
        "train": {
            "data": {"path": dom, "seq_len": 32}, "batch_size": 4, "max_steps": 8, "checkpoint_every": 2,
            "progress_interval_s": 5, "schedule": {"lr": 3e-3}, "dba": {"boost": 16},
        },
        "methods": ["dba", "direct"],
        "eval": {"sets": [
            {"name": "dom", "kind": "domain", "data": {"path": dom_eval, "seq_len": 32}},
            {"name": "gen", "kind": "general", "data": {"path": gen_eval, "seq_len": 32}},
            {"name": "mc", "kind": "domain", "type": "choice", "data": {"path": mc, "seq_len": 32}},
        ]},
    }  # fmt: skip
    if base is not None:
        on_finished_base(tree, base)
    tree.update(sections)
    f = tmp_path / f"{out}.yaml"
    f.write_text(yaml.safe_dump(tree))
    return str(f)


class FinishedRun(NamedTuple):
    folder: Path  # its data and config; the run's output is run_dir
    cfg_file: str
    report: dict  # read before any test could touch the folder
    log: str  # what the run logged (dba_ray's INFO lines)

    @property
    def run_dir(self) -> Path:
        return self.folder / "uninterrupted"


def pretrained_base(run_dir: Path) -> str:
    """The base model a `run` with a pretrain section made, under its output_dir."""
    return str(next(Path(run_dir).glob("pretrain/*/pretrain/model")))


def on_finished_base(tree: dict, run: FinishedRun) -> dict:
    """``tree`` set to train on ``run``'s pretrained base model and reuse its ĝ_G: no
    pretraining, and ``run``'s Stage 1 settings and general data (an artifact made with
    other ones is refused, not replaced)."""
    done = yaml.safe_load(Path(run.cfg_file).read_text())
    tree.pop("pretrain", None)
    tree["model"] = {"name_or_path": pretrained_base(run.run_dir)}
    tree["stage1"] = {**done["stage1"], "output": str(run.run_dir / "global_gradient")}
    return tree


@pytest.fixture(scope="session")
def finished_run(ray_cluster, tmp_path_factory) -> FinishedRun:
    """One `dba-ray run` that nobody kills, shared by the session (each is minutes of
    Ray Train on 2 cores): test_run checks its report and reuses its base model and
    ĝ_G; test_recovery's killed commands must end with its scores; test_merge,
    test_compare and test_tune train on its base model and reuse its ĝ_G."""
    from dba_ray.cli import main

    tmp = tmp_path_factory.mktemp("finished-run")
    cfg_file = write_run_config(tmp, "uninterrupted")
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("dba_ray")
    logger.addHandler(handler)
    try:
        assert main(["run", cfg_file]) == 0
    finally:
        logger.removeHandler(handler)
    report = json.loads((tmp / "uninterrupted" / "report.json").read_text())
    return FinishedRun(tmp, cfg_file, report, "\n".join(lines))
