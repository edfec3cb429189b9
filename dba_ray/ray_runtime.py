"""Joining or starting the Ray cluster a command runs on."""

from __future__ import annotations

import logging
import os

import ray
from ray.train import ScalingConfig

from dba_ray.config import RayConfig
from dba_ray.errors import UserError

log = logging.getLogger("dba_ray")


def ensure_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, the one this job was submitted to, or start one."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.num_cpus)
    log.info("Ray cluster resources: %s", ray.cluster_resources())


def scaling(num_workers: int, cpus_per_worker: int, use_gpu: bool) -> ScalingConfig:
    """Train's scaling: CPUs per worker reserved explicitly (also its torch threads)."""
    return ScalingConfig(
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
    )


def check_cpu_headroom(worker_cpus: int) -> None:
    """Refuse a layout where Train workers would take every CPU from Ray Data.

    Ray Data would then wait forever for a CPU to read and tokenize with. Only checked
    on fixed-size clusters: an autoscaling one may add nodes.
    """
    total = ray.cluster_resources().get("CPU", 0)
    autoscaling = bool(os.environ.get("RAY_ADDRESS")) and total == 0
    if not autoscaling and worker_cpus >= total:
        raise UserError(
            f"Train workers need {worker_cpus} CPUs but the cluster has {total:g}; "
            "leave at least one for Ray Data (raise ray.num_cpus or lower "
            "num_workers / cpus_per_worker)"
        )
