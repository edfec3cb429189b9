"""Joining or starting the Ray cluster a command runs on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray
import torch
from ray._private.services import canonicalize_bootstrap_address, find_bootstrap_address
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from dba_ray import console, storage
from dba_ray.config import RayConfig, Stage1Config, TrainConfig
from dba_ray.errors import UserError

log = logging.getLogger("dba_ray")


def ensure_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, the one this job was submitted to, or one `ray start`
    started on this machine; else start an embedded local cluster of ``cfg.num_cpus``."""
    if ray.is_initialized():
        return
    address = cluster_address(cfg)
    if address:
        # A running cluster has its own resources: ray.init refuses num_cpus when joining.
        if cfg.num_cpus is not None:
            log.info("joining the Ray cluster at %s: ray.num_cpus does not apply", address)
        ray.init(address=address, **console.init_options(embedded=False, gcs=_gcs_address(address)))
    else:
        # Train's preemption watcher (an actor per run) reports nodes being drained: a
        # cluster on this one machine has none to drain. Train hands the driver's
        # setting to its controller.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address="local", num_cpus=cfg.num_cpus, **console.init_options(embedded=True))
    log.info("Ray cluster resources: %s", ray.cluster_resources())


def _gcs_address(address: str) -> str | None:
    """``address`` as host:port that any node resolves alike (localhost becomes this
    node's IP); None for a Ray Client URI or "auto", which name no GCS here."""
    if "://" in address or address == "auto":
        return None
    return canonicalize_bootstrap_address(address)


def cluster_address(cfg: RayConfig) -> str | None:
    """The running cluster a command joins; None: it starts an embedded local one."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or _started_here()


def node_resources() -> list[dict[str, float]]:
    """The resources of each live node of the joined cluster (memory in bytes)."""
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def cluster_totals(cfg: RayConfig) -> tuple[dict[str, float], bool]:
    """(the CPUs and GPUs commands get, whether the cluster may grow). An embedded
    cluster's come from the config, before it starts; a running cluster's once joined
    (joining starts no work), and a joined one may have an autoscaler."""
    joined = bool(cluster_address(cfg))
    if not ray.is_initialized() and not joined:
        # What ray.init detects: the CPUs this process may use, the GPUs CUDA sees.
        return {"CPU": cfg.num_cpus or len(os.sched_getaffinity(0)), "GPU": torch.cuda.device_count()}, False
    ensure_ray(cfg)
    return ray.cluster_resources(), joined


def _started_here() -> str | None:
    """The address `ray start` recorded on this machine (what a bare ray.init() would
    join), e.g. on the head node of a launched cluster; None when there is none."""
    return find_bootstrap_address(None)


def in_submitted_job() -> bool:
    """True in the driver of a `ray job submit` job (Ray hands it the job's config)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def warn_if_output_in_job_dir(output_dir: str) -> None:
    """Inside a job the current directory is the uploaded working dir: relative data
    paths find the uploaded files there, but outputs written there are lost with it."""
    if not in_submitted_job() or storage.is_remote(output_dir):
        return
    local = storage.absolute(output_dir)
    if Path(local).is_relative_to(Path.cwd()):
        log.warning(
            "output_dir %s is inside this job's uploaded working dir, which Ray deletes "
            "later: use an s3:// or gs:// URI or an absolute path on shared storage",
            local,
        )


def scaling(num_workers: int, cpus_per_worker: int, use_gpu: bool, cfg: RayConfig) -> ScalingConfig:
    """Train's scaling: CPUs per worker reserved explicitly (also its torch threads),
    plus ``ray.worker_resources``."""
    return ScalingConfig(
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **cfg.worker_resources},
    )


class LeanTorchTrainer(TorchTrainer):
    """A TorchTrainer without the helper actors a run has no use for. Ray Train 2.60
    starts two for every run, each a process of about 2 to 3 CPU-s:

    - a DatasetManager, datasets or not: left out when the run hands its workers no Ray
      Dataset (Stage 2 and pretraining hand them object refs);
    - a detached PlacementGroupCleaner, which removes the run's placement group when the
      controller dies without removing it itself: kept only with ``in_tune_trial``. Tune
      ends a trial it stops early (ASHA) by killing it, controller included, and the
      sweep goes on; elsewhere the controller runs on the driver's node and its death
      fails the command, whose job (and the placement group with it) then ends. A Python
      program that calls run_train and goes on after such an error keeps the placement
      group until it exits.

    It overrides a private method, so ray is pinned in pyproject.toml and
    tests/test_train.py checks the callback list."""

    def __init__(self, *args, in_tune_trial: bool = False, **kwargs):
        self._in_tune_trial = in_tune_trial
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self) -> list:
        unused = () if self.datasets else (DatasetsCallback,)
        unused += () if self._in_tune_trial else (PlacementGroupCleanerCallback,)
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unused)]


def check_fits(what: str, key: str, workers: Stage1Config | TrainConfig, cfg: RayConfig) -> None:
    """Refuse Train workers (``key``'s num_workers, cpus_per_worker, use_gpu) that the
    cluster cannot hold while leaving a CPU to Ray Data, which would otherwise wait
    forever for one to read and tokenize with. A cluster that may grow is refused only
    what it can never give: workers on a head without CPUs or GPUs come with new nodes."""
    totals, can_grow = cluster_totals(cfg)
    cpus, gpus = totals.get("CPU", 0), totals.get("GPU", 0)
    need = workers.num_workers * workers.cpus_per_worker
    if need >= cpus and not (can_grow and cpus == 0):
        raise UserError(
            f"{what}: its Train workers need {need} CPUs but the cluster has {cpus:g}; leave at least one "
            f"for Ray Data (raise ray.num_cpus or lower {key}.num_workers / {key}.cpus_per_worker)"
        )
    if workers.use_gpu and workers.num_workers > gpus and not can_grow:
        raise UserError(
            f"{what}: its {workers.num_workers} Train workers need one GPU each but the cluster has {gpus:g}; "
            f"lower {key}.num_workers, or run on a machine with more GPUs"
        )
