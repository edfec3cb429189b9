"""cluster/: the launcher YAMLs pass Ray's own validation, the KubeRay manifests have
what they need, and every Ray version pin agrees with the installed Ray."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = {"aws": "s3://", "gcp": "gs://"}


def load(rel: str):
    return yaml.safe_load((CLUSTER / rel).read_text())


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: fill in the provider's
    defaults, then validate against Ray's cluster-config schema and rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("cloud", LAUNCHER)
def test_launcher_config_is_valid_and_autoscales_gpus(cloud):
    cfg = ray_up_checks(load(f"{cloud}.yaml"))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    assert all(t["min_workers"] == 0 < t["max_workers"] for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]

    def interruptible(node_config):
        if cloud == "aws":
            return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        sched = node_config.get("scheduling", {})
        return sched.get("preemptible") is True or sched.get("provisioningModel") == "SPOT"

    kinds = [interruptible(t["node_config"]) for t in workers.values()]
    assert True in kinds and False in kinds  # a spot/preemptible and an on-demand type

    docker = cfg["docker"]
    assert docker["disable_shm_size_detection"] is True
    for opts in ("head_run_options", "worker_run_options"):
        assert any(re.fullmatch(r"--shm-size=\d+g", o) for o in docker[opts]), opts
    assert docker["worker_image"].endswith("-gpu") and docker["head_image"].endswith("-cpu")

    # Nodes get this repository and install it (with Ray pinned) before Ray starts.
    assert cfg["file_mounts"]["/home/ray/dba-ray"] == "."
    setup = " && ".join(cfg["setup_commands"])
    assert f'"ray[default,train,tune,data]=={ray.__version__}"' in setup
    assert "pip install -q /home/ray/dba-ray" in setup
    # Token auth stays on across the cluster.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token ray start" in " ".join(cfg[key])
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert cfg["metadata"]["storage_path"].startswith(LAUNCHER[cloud])


def test_broken_launcher_configs_are_rejected():
    good = load("aws.yaml")
    typo = {**copy.deepcopy(good), "max_worker": 3}  # an unknown key
    no_resources = copy.deepcopy(good)
    del no_resources["available_node_types"]["gpu"]["resources"]
    bad_docker = copy.deepcopy(good)
    bad_docker["docker"]["shm_size"] = "24g"  # not a docker option Ray knows
    for broken in (typo, no_resources, bad_docker):
        with pytest.raises(jsonschema.ValidationError):
            ray_up_checks(broken)
    wrong_head = {**copy.deepcopy(good), "head_node_type": "nope"}
    with pytest.raises(ValueError, match="head_node_type"):
        ray_up_checks(wrong_head)
    too_few = {**copy.deepcopy(good), "max_workers": 0}
    too_few["available_node_types"]["gpu"]["min_workers"] = 1
    with pytest.raises(ValueError, match="max_workers"):
        ray_up_checks(too_few)


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert spec["workerGroupSpecs"]
    for w in spec["workerGroupSpecs"]:
        assert w["groupName"] and w["minReplicas"] == 0 < w["maxReplicas"]
        assert w["replicas"] <= w["maxReplicas"]
        for c in _containers(w):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for g in groups:
        pod = g["template"]["spec"]
        shm = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            assert c["image"].startswith(f"rayproject/ray:{ray.__version__}-")
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            vol = shm[mounts["/dev/shm"]]
            assert vol["emptyDir"]["medium"] == "Memory"
            assert re.fullmatch(r"\d+Gi", vol["emptyDir"]["sizeLimit"])


def test_kuberay_raycluster():
    rc = load("kuberay/raycluster.yaml")
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(rc["spec"])


def test_kuberay_rayjob():
    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("dba-ray run ")
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"])
    # The same cluster as raycluster.yaml, and the same runtime env as `ray job submit`.
    assert spec["rayClusterSpec"] == load("kuberay/raycluster.yaml")["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env.pop("working_dir").endswith(".zip")
    assert env == load("runtime_env.yaml")


def test_runtime_env_installs_the_working_dir():
    env = load("runtime_env.yaml")
    # The uploaded package itself, so its pyproject.toml pin decides Ray's version.
    assert env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]
    ray.runtime_env.RuntimeEnv(**env)  # Ray accepts it


PIN = re.compile(
    r"ray\[[a-z,]+\]==(?P<a>[\w.]+)|rayproject/ray:(?P<b>[\w.]+?)-py"
    r"|rayVersion:\s*\"?(?P<c>[\w.]+)"
)


def ray_pins(text: str) -> set[str]:
    return {next(v for v in m.groups() if v) for m in PIN.finditer(text)}


def test_every_ray_pin_agrees_with_the_installed_ray():
    files = [ROOT / "pyproject.toml", *sorted(CLUSTER.rglob("*.yaml"))]
    pinned = {f.relative_to(ROOT).as_posix(): ray_pins(f.read_text()) for f in files}
    # runtime_env.yaml pins through the package it installs (pyproject.toml).
    assert pinned.pop("cluster/runtime_env.yaml") == set()
    assert set(pinned) >= {
        "pyproject.toml",
        "cluster/aws.yaml",
        "cluster/gcp.yaml",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayjob.yaml",
    }
    assert {f: p for f, p in pinned.items() if p != {ray.__version__}} == {}
    # The pattern does see a pin that drifted.
    aws = (CLUSTER / "aws.yaml").read_text()
    drifted = aws.replace(f"ray:{ray.__version__}-py311-gpu", "ray:0.0.1-py311-gpu")
    assert ray_pins(drifted) == {ray.__version__, "0.0.1"}
