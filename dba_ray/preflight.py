"""Checks a command makes before it starts anything costly (pretraining, Stage 1, a
training run): whatever the config and the files' names and sizes can tell is refused
here, with a message naming the thing and what to do, instead of hours later."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import torch

from dba_ray import artifact, harness, memory_plan, storage
from dba_ray.config import Config, DataConfig, MethodSpec
from dba_ray.data.records import check_file, file_format, read_choice_records
from dba_ray.errors import UserError
from dba_ray.merge_curves import general_fisher_uri
from dba_ray.methods import config_for_run, phase_name, uses_global_gradient
from dba_ray.model import load_empty_model
from dba_ray.ray_runtime import check_fits, cluster_address, cluster_totals, ensure_ray, node_resources
from dba_ray.reuse import planned_base, pretrain_plan, refuse_replacing, stage1_mismatch

log = logging.getLogger("dba_ray")

# What `from_pretrained` can load weights from.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def writable(uri: str, what: str) -> None:
    """Refuse a destination that cannot be written (a missing bucket, refused
    credentials, a read-only or non-directory path): a probe file is written and removed,
    locally in the nearest folder that exists, so nothing is created here."""
    uri = storage.absolute(uri)
    try:
        if storage.is_remote(uri):
            fs, path = storage.filesystem_and_path(uri)
            bucket = path.split("/")[0]
            # Asked first: a write to a missing bucket is retried for minutes.
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise UserError(
                    f"cannot write to {what} {uri}: bucket {bucket} does not exist; create it or correct the URI"
                )
            probe = storage.join(uri, f".dba-ray-probe-{uuid.uuid4().hex[:8]}")
            storage.write_bytes_atomic(probe, b"")
            storage.delete(probe)
        else:
            folder = Path(uri)
            while not folder.exists():
                folder = folder.parent
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} is a file")
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:  # pyarrow's errors are OSErrors too
        reason = re.sub(r"^When [^:]*: |\s*\(Request ID: [^)]*\)", "", " ".join(str(e).split()))
        raise UserError(
            f"cannot write to {what} {uri}: {reason}; check that it exists and that you may "
            "write there (credentials, permissions), or choose another"
        ) from None


def data_source(data: DataConfig, key: str, max_len: int | None, choice: bool = False) -> None:
    """A data source that exists, holds files of a known format, and a seq_len the
    model can take; its local files' records are well formed (``choice``: those of a
    multiple-choice set, read whole as evaluation will)."""
    if max_len is not None and data.seq_len > max_len:
        raise UserError(
            f"{key}.seq_len {data.seq_len} is longer than the model's context ({max_len} positions): lower it"
        )
    if data.path is None or data.path.startswith("builtin:"):
        return
    if not storage.exists(data.path):
        raise UserError(f"{key}.path {data.path} does not exist: correct the path")
    files = [(f, size) for f, size in storage.list_files(data.path) if size > 0]
    if not files:
        raise UserError(f"{key}.path {data.path} holds no non-empty data files: point it at your data")
    for f, _ in files:
        file_format(f, data.file_format)
    if choice:
        read_choice_records(data)
    elif not storage.is_remote(data.path):
        _contents(data, key, files)


# Local data files are read before Ray starts, whole while their sizes add up to at most
# CHECK_BYTES (a malformed record is refused in seconds, not after Ray's start-up); of
# the files past that, the first CHECK_RECORDS records each. The rest is checked while
# Ray Data reads it.
CHECK_BYTES = 16 * 2**20
CHECK_RECORDS = 100


def _contents(data: DataConfig, key: str, files: list[tuple[str, int]]) -> None:
    budget, whole, kept, skipped, first = CHECK_BYTES, True, 0, 0, None
    for f, size in files:
        full = size <= budget
        budget -= size if full else 0
        whole = whole and full
        k, s, fs = check_file(f, data, None if full else CHECK_RECORDS)
        kept, skipped, first = kept + k, skipped + s, first or fs
    if whole and not kept:
        why = [f"{skipped} malformed, skipped, the first at {first}"] if skipped else []
        why += [f"none in subset {data.subset}"] if data.subset != "all" else []
        because = f" ({'; '.join(why)})" if why else ""
        raise UserError(f"{key}.path {data.path} holds no records to use{because}: point it at your data")


def model(cfg: Config) -> int | None:
    """The base model can be loaded: its config is readable and a local folder holds
    weights. Returns its context length (None when it has none)."""
    path = cfg.model.name_or_path
    if path.startswith(("/", ".", "~")) and not storage.exists(path):
        raise UserError(
            f"model.name_or_path {path} does not exist: give a folder written by save_pretrained, or a hub name"
        )
    empty = load_empty_model(cfg.model)  # refuses a missing model or a bad config
    if not storage.is_remote(path) and storage.exists(path):
        names = [f for f, _ in storage.list_files(path)]
        if not any(n.endswith(_WEIGHTS) for n in names):
            raise UserError(
                f"model {path} has a config but no weights (*.safetensors or *.bin): "
                "copy the weight files there, or point model.name_or_path at a complete save_pretrained folder"
            )
    return getattr(empty.config, "max_position_embeddings", None)


def check(cfg: Config, specs: list[MethodSpec], concurrent: tuple[str, int] | None = None, merge: bool = False) -> None:
    """Refuse, with a UserError, what would fail or do harm later in `run`, `compare` or
    `tune` training ``specs``; ``concurrent``: the option that sets how many run at once,
    and its value; ``merge``: the command also merges (check_merge)."""
    resolved = {s.name: config_for_run(cfg, s).train for s in specs}
    needs_grad = any(uses_global_gradient(t.dba) for t in resolved.values())
    # What needs v_G: the fisher anchor, and the boost applied in update space.
    fisher = [
        n for n, t in resolved.items() if t.dba.anchor == "fisher" or (t.dba.ggb and t.dba.boost_mode == "update")
    ]
    mixture = [s.name for s in specs if s.method == "mixture"]
    computes_grad = needs_grad and cfg.train.global_gradient is None
    eval_kinds(cfg)
    _data(cfg, mixture, stage1=computes_grad)

    if cfg.train.global_gradient is not None and needs_grad:
        _global_gradient(cfg, cfg.train.global_gradient, fisher)
    elif fisher and not cfg.stage1.second_moment:
        raise UserError(
            f"{fisher[0]} uses the fisher anchor or boost_mode update, which need v_G: set stage1.second_moment: true"
        )

    writable(cfg.output_dir, "output_dir")
    if computes_grad:
        # Stage 1 writes there after pretraining: an unwritable place would fail only then.
        writable(cfg.stage1_output(), "stage1.output")
        uri = storage.absolute(cfg.stage1_output())
        if not cfg.stage1.overwrite and storage.exists(storage.join(uri, artifact.META)):
            base = planned_base(cfg)
            # A base model still to be pretrained has no shapes yet: checked again after.
            known = cfg.pretrain is None or storage.exists(storage.join(base.model.name_or_path, "config.json"))
            differs = stage1_mismatch(base, artifact.ArtifactMeta.read(uri), check_shapes=known)
            if differs is not None:
                raise refuse_replacing(uri, differs)
    if merge:
        check_merge(cfg)
    resources(cfg, specs, stage1=computes_grad, concurrent=concurrent)  # last: it may join a cluster


def check_train(cfg: Config, spec: MethodSpec) -> None:
    """`dba-ray train`: as ``check``, but Stage 1 is not run: the ĝ_G a method reads
    must exist already (run_train checks that it fits the model before any worker starts)."""
    _data(cfg, [spec.name] if spec.method == "mixture" else [], stage1=False)
    d = config_for_run(cfg, spec).train.dba
    if uses_global_gradient(d):
        fisher = d.anchor == "fisher" or (d.ggb and d.boost_mode == "update")
        _global_gradient(cfg, cfg.global_gradient_source(), [spec.name] if fisher else [])
    resources(cfg, [spec], stage1=False)


def _global_gradient(cfg: Config, uri: str, fisher: list[str]) -> None:
    """The ĝ_G at ``uri`` exists, was made for this model's architecture (a pretrain
    section keeps the architecture of ``model``, so this holds before pretraining), and
    has v_G when ``fisher`` (runs that need it) is not empty."""
    meta = artifact.ArtifactMeta.read(storage.absolute(uri))
    artifact.check_fingerprint(meta, load_empty_model(cfg.model), cfg.model.name_or_path)
    if fisher and not meta.has_second_moment:
        raise UserError(
            f"{fisher[0]} uses the fisher anchor or boost_mode update, which need v_G, but "
            f"{uri} has none: make it with stage1.second_moment: true"
        )


def eval_kinds(cfg: Config) -> None:
    """Every list of eval sets that S is computed on holds a set of each kind: without a
    domain or a general one, S = HM(S_D, S_G) is NaN in every report, and every choice
    made on it (a merge knob, a sweep's best trial) is arbitrary."""
    lists = [
        ("eval.sets", cfg.eval.sets),
        ("eval.validation_sets", cfg.eval.validation_sets),
        ("tune.validation_sets", cfg.tune.validation_sets),
    ]
    for key, sets in lists:
        kinds = {s.kind for s in sets}
        missing = [k for k in ("domain", "general") if sets and k not in kinds]
        if missing:
            names = ", ".join(s.name for s in sets)
            raise UserError(
                f"{key} has no {missing[0]} set (it holds {names}, all {kinds.pop()}): S = HM(S_D, S_G) "
                f"needs at least one set of each kind; add one with kind: {missing[0]}"
            )


def check_stage1(cfg: Config) -> None:
    """`dba-ray global-gradient`: its general data and its workers."""
    if cfg.stage1.data is None:
        raise UserError("stage1.data is required: the general data to compute ĝ_G on")
    data_source(cfg.stage1.data, "stage1.data", model(cfg))
    resources(cfg, [], stage1=True)


def _data(cfg: Config, mixture: list[str], stage1: bool) -> None:
    """The model and every data source the command reads (``mixture``: the mixture runs
    among its methods; ``stage1``: whether it computes ĝ_G) can be read."""
    if cfg.train.data is None:
        raise UserError("train.data is required: the domain data to fine-tune on")
    if mixture and cfg.train.mixture.data is None and cfg.stage1.data is None:
        raise UserError(f"{mixture[0]} mixes in general data: set train.mixture.data or stage1.data")
    max_len = model(cfg)
    harness.require_harness(cfg)
    sources = [("train.data", cfg.train.data, False)]
    sources += [
        (f"eval set {s.name!r} data", s.data, s.type == "choice")
        for s in [*cfg.eval.sets, *cfg.eval.validation_sets, *cfg.tune.validation_sets]
        if s.data is not None
    ]  # lm_eval sets name harness tasks instead
    if cfg.pretrain is not None:
        sources.append(("pretrain.data", cfg.pretrain.data, False))
    if mixture and cfg.train.mixture.data is not None:
        sources.append(("train.mixture.data", cfg.train.mixture.data, False))
    if stage1 or (mixture and cfg.train.mixture.data is None):
        if cfg.stage1.data is None:
            raise UserError("stage1.data is required: the general data to compute ĝ_G on")
        sources.append(("stage1.data", cfg.stage1.data, False))
    for key, data, choice in sources:
        data_source(data, key, max_len, choice)


def resources(cfg: Config, specs: list[MethodSpec], stage1: bool, concurrent: tuple[str, int] | None = None) -> None:
    """Each phase's Train workers fit the cluster (an embedded one as the config makes
    it, a running one joined), in the order they run: pretraining (unless cached),
    Stage 1 (``stage1``), each of ``specs``. ``concurrent`` (option, value): more runs
    at once than the cluster holds wait for each other, which is said here."""
    phases = []
    if cfg.pretrain is not None:
        pre, _, model_dir = pretrain_plan(cfg)
        if not storage.exists(storage.join(model_dir, "config.json")):
            phases.append(("pretraining", "train", pre.train))
    if stage1:
        phases.append(("stage 1", "stage1", cfg.stage1))
    trains = [config_for_run(cfg, s).train for s in specs]
    phases += [(phase_name(s), "train", t) for s, t in zip(specs, trains)]
    for what, key, workers in phases:
        check_fits(what, key, workers, cfg.ray)
    if concurrent is None:
        return
    cpus = cluster_totals(cfg.ray)[0].get("CPU", 0)
    widest = max(t.num_workers * t.cpus_per_worker for t in trains)
    fit = int((cpus - 1) // widest)
    if 0 < fit < concurrent[1]:
        log.warning(
            "%s %d: runs of up to %d CPUs each, and one CPU for Ray Data, fit %d at a time in %g CPUs; "
            "the others wait (raise ray.num_cpus to run them at once)",
            *concurrent,
            widest,
            fit,
            cpus,
        )


def check_merge(cfg: Config) -> None:
    """What a merge section needs, refused before any training."""
    mc = cfg.merge
    if mc is None:
        return
    unknown = sorted(set(mc.methods) - {m.name for m in cfg.methods})
    if unknown:
        raise UserError(f"merge.methods names {unknown}, which are not in methods ({[m.name for m in cfg.methods]})")
    if mc.mode == "fisher" and cfg.train.global_gradient is None and not cfg.stage1.second_moment:
        raise UserError("merge.mode fisher weighs by v_G: set stage1.second_moment: true")
    if mc.mode == "fisher" and cfg.train.global_gradient is not None:
        general_fisher_uri(cfg)  # a given artifact: v_G present, made for this model


# ---------------------------------------------------------------- memory

# GPU memory of the accelerator types Ray reports (`accelerator_type:<T>`) that name one
# size, in MiB as nvidia-smi shows them. Others (A100, V100: two sizes each) are not checked.
GPU_MIB = {
    "T4": 15360,
    "A10G": 23028,
    "L4": 23034,
    "L40S": 46068,
    "A100-40G": 40960,
    "A100-80G": 81920,
    "H100": 81559,
    "H20": 97871,
    "H200": 143771,
}
# The driver and Ray's own processes on an embedded local cluster (GCS, raylet,
# dashboard, Train's controller, Ray Data's coordinator and tokenizing tasks). Measured
# beside a 2-worker Stage 1 on CPU: 2.1 GiB of PSS before the workers start (their RSS
# adds up to 3.8 GiB: they share torch's and Ray's libraries), then about 0.4 GiB per
# Ray Data process.
LOCAL_RAY_OVERHEAD = int(2.5 * memory_plan.GiB)


def memory_phases(cfg: Config, command: str, spec: MethodSpec | None = None):
    """The model's shape (built on the meta device) and the phases ``command`` runs."""
    shape = memory_plan.model_shape(load_empty_model(cfg.model))
    pretrain = pretrain_plan(cfg)[0] if cfg.pretrain is not None else None
    plan = memory_plan.phases(cfg, shape, command, shard_bytes=artifact.MAX_SHARD_BYTES, pretrain=pretrain, spec=spec)
    return shape, plan


def memory(cfg: Config, command: str, spec: MethodSpec | None = None) -> None:
    """Refuse a config whose memory plan does not fit the workers it will get: this
    machine on an embedded local cluster (its RAM and GPUs, before Ray starts), else the
    joined cluster's nodes. What cannot be known is said in a warning instead."""
    _, plan = memory_phases(cfg, command, spec)
    local = cluster_address(cfg.ray) is None
    if not local:
        ensure_ray(cfg.ray)
    nodes = _local_node(cfg) if local else node_resources()
    for phase in plan:
        if phase.gpu:
            _check_gpu(phase, nodes)
        _check_ram(phase, nodes, local)


def _local_node(cfg: Config) -> list[dict[str, float]]:
    """This machine as Ray would see it: CPUs, RAM, and its GPUs' memory."""
    node = {"CPU": cfg.ray.num_cpus or os.cpu_count(), "ram": psutil.virtual_memory().total}
    if torch.cuda.is_available():
        node["GPU"] = torch.cuda.device_count()
        node["gpu_bytes"] = min(torch.cuda.get_device_properties(i).total_memory for i in range(node["GPU"]))
    return [node]


def _gpu_bytes(node: dict[str, float]) -> float | None:
    if "gpu_bytes" in node:
        return node["gpu_bytes"]
    types = [k.split(":", 1)[1] for k in node if k.startswith("accelerator_type:")]
    return GPU_MIB[types[0]] * 2**20 if len(types) == 1 and types[0] in GPU_MIB else None


def _check_gpu(phase: memory_plan.Phase, nodes: list[dict[str, float]]) -> None:
    gpus = [n for n in nodes if n.get("GPU")]
    sizes = [_gpu_bytes(n) for n in gpus]
    if not gpus or None in sizes:
        log.warning(
            "%s: the memory of the GPUs its workers will get is unknown (no GPU visible, or a type Ray "
            "does not report with one size): not checked; `dba-ray plan` shows what it needs",
            phase.name,
        )
        return
    peak = phase.peak()
    if peak.device > min(sizes):
        raise UserError(
            f"{_needs(phase, peak.device, 'GPU memory')}, but the smallest GPU its workers may get has "
            f"{memory_plan.gib(min(sizes))}: {_remedy(phase)}"
        )


def _check_ram(phase: memory_plan.Phase, nodes: list[dict[str, float]], local: bool) -> None:
    per_worker = phase.peak().host
    if local:
        node = nodes[0]
        slots = max(1, int(node["CPU"] // phase.cpus_per_worker))
        jobs = min(phase.at_once, max(1, slots // phase.workers)) if phase.layout != "task" else 1
        processes = phase.workers * jobs if phase.layout != "task" else min(phase.at_once, slots)
        needed = processes * per_worker + LOCAL_RAY_OVERHEAD
        if needed > node["ram"]:
            raise UserError(
                f"{_needs(phase, per_worker, 'RAM')}; {processes} such process(es) at once and Ray's own "
                f"need {memory_plan.gib(needed)}, but this machine has {memory_plan.gib(node['ram'])}: {_remedy(phase)}"
            )
        return
    room = [(n.get("memory", 0) + n.get("object_store_memory", 0), n.get("CPU", 0)) for n in nodes]
    if not any(cpus for _, cpus in room):
        log.warning("%s: the cluster reports no nodes yet (autoscaling?): RAM not checked", phase.name)
        return
    fit = sum(min(int(cpus // phase.cpus_per_worker), int(ram // per_worker)) for ram, cpus in room)
    if fit < phase.workers:
        raise UserError(
            f"{_needs(phase, per_worker, 'RAM')}, but the cluster's nodes hold only {fit} such worker(s) "
            f"(largest node RAM {memory_plan.gib(max(r for r, _ in room))}): {_remedy(phase)}"
        )


def _needs(phase: memory_plan.Phase, size: float, what: str) -> str:
    who = f"{phase.workers} worker(s), {phase.layout}" if phase.layout != "task" else "a task"
    return f"memory plan: {phase.name} ({who}) needs {memory_plan.gib(size)} of {what} per process"


def _remedy(phase: memory_plan.Phase) -> str:
    hint = "more workers with parallel: fsdp, " if phase.layout != "task" else ""
    return f"use {hint}a smaller batch or sequence, bigger machines, or --skip-memory-check (see dba-ray plan)"
