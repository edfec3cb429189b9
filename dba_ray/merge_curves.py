"""Merge curves on Ray: for each trained model, the merges toward its base at every
knob (dba_ray/merge.py), scored on the eval sets and the validation sets as Ray tasks
(no training); the knob is chosen on validation S only and that model is exported.

For a ``fisher`` merge, F_D (the domain data's diagonal Fisher at θ_T) comes from the
Stage 1 job run on ``train.data`` with the trained model as its base, kept in the run's
folder as ``domain_fisher`` (a global-gradient artifact whose v_G is F_D) and reused
while the model's files and the data are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import ray
import torch
from huggingface_hub import snapshot_download

from dba_ray import artifact, storage
from dba_ray.config import Config, MergeConfig, ModelConfig
from dba_ray.data import describe_source
from dba_ray.data.arrays import EvalData
from dba_ray.errors import UserError
from dba_ray.evaluate import score_sets, scored_tokens
from dba_ray.global_gradient import run_global_gradient
from dba_ray.merge import FisherPair, SavedTensors, merge_into
from dba_ray.model import BUILTIN_MODEL, load_empty_model, load_model
from dba_ray.ray_runtime import ensure_ray
from dba_ray.tokenizer import load_tokenizer

log = logging.getLogger("dba_ray")


@dataclass
class MergePoint:
    knob: float
    test: dict  # on eval.sets: {"eval": per-set metrics, "S_D", "S_G", "S"}
    validation: dict | None  # the same on eval.validation_sets (None without them)


@dataclass
class MergeCurve:
    run: str
    mode: str  # linear (knob α) or fisher (knob λ)
    model_dir: str  # the trained model the curve starts from
    points: list[MergePoint]
    chosen: float | None  # the knob with the best validation S (None: no validation sets)
    exported_to: str | None  # the chosen merge, saved with save_pretrained
    eval_tokens: int  # tokens scored for the curve's points (forward passes), its ends already scored apart
    fisher_tokens: int  # tokens of the domain-Fisher pass (forward + backward), fisher only
    wall_s: float
    domain_fisher: str | None = None  # the F_D artifact (fisher only)

    def chosen_point(self) -> MergePoint | None:
        return next((p for p in self.points if p.knob == self.chosen), None)


@dataclass
class EvalGroups:
    """Tokenized eval sets in the object store: what reports show, and what is chosen on."""

    test: EvalData
    validation: EvalData | None = None
    tokens: dict[str, int] = field(default_factory=dict)  # scored tokens per group

    @classmethod
    def of(cls, test, validation=None) -> "EvalGroups":
        groups = cls(test, validation if validation and validation.refs else None)
        for name, group in (("test", groups.test), ("validation", groups.validation)):
            if group is not None:
                groups.tokens[name] = sum(scored_tokens(ray.get(r)) for r in group.refs.values())
        return groups


# ---------------------------------------------------------------- the merged model


def saved_tensors(model_cfg: ModelConfig, names: list[str] | None = None):
    """A model's parameters by name: read one tensor at a time from its safetensors
    files when they hold every name, else (the builtin model, .bin weights, checkpoints
    saved under other names) the model loaded whole."""
    if model_cfg.name_or_path != BUILTIN_MODEL:
        try:
            saved = SavedTensors(_local_model_dir(model_cfg.name_or_path, model_cfg.revision))
            if names is None or all(n in saved for n in names):
                return saved
        except UserError:
            pass
    return {n: p.detach() for n, p in load_model(model_cfg).named_parameters()}


def base_tensors(cfg: Config, names: list[str] | None = None):
    """θ0 by parameter name (see ``saved_tensors``)."""
    return saved_tensors(cfg.model, names)


def _local_model_dir(name: str, revision: str | None) -> str:
    path = storage.local_copy(storage.absolute(name) if os.path.exists(name) else name, "config.json")
    if os.path.isdir(path):
        return path
    try:  # a hub name: its cached snapshot
        return snapshot_download(name, revision=revision, allow_patterns=["*.safetensors", "*.json"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: one line
        raise UserError(f"cannot read the base model {name!r} for merging: {str(e).splitlines()[0]}") from None


def _fisher_tensors(uri: str):
    return SavedTensors(storage.local_copy(storage.absolute(uri), artifact.META), prefix="second_moment")


class CurveModel:
    """One model that takes every merge of a trained model in turn: the trained model,
    θ0 and the Fishers are read once, and each knob's merge is written over the last."""

    def __init__(self, cfg: Config, model_dir: str, mode: str, fisher_uris: tuple | None, device="cpu"):
        trained = cfg.model.model_copy(update={"name_or_path": model_dir})
        self.model = load_model(trained).to(device)
        names = [n for n, _ in self.model.named_parameters()]
        self.trained = saved_tensors(trained, names)
        self.base = base_tensors(cfg, names)
        self.fisher = None
        if mode == "fisher":
            self.fisher = FisherPair.of(_fisher_tensors(fisher_uris[0]), _fisher_tensors(fisher_uris[1]), names)

    def at(self, knob: float) -> torch.nn.Module:
        merge_into(self.model, self.base, knob, self.fisher, self.trained)
        return self.model


def merged_model(cfg: Config, model_dir: str, mode: str, knob: float, fisher_uris: tuple | None):
    """The trained model at ``model_dir`` merged toward the base at ``knob`` (on CPU)."""
    return CurveModel(cfg, model_dir, mode, fisher_uris).at(knob)


@ray.remote
def _score_curve(cfg_dump: dict, model_dir: str, mode: str, knobs: list, fisher_uris, groups: dict, threads: int):
    """Every knob's merge scored on ``groups``, in one task: the weights and the eval
    data are loaded once, not once per knob (a task's start-up outweighs scoring a
    small model)."""
    torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_dump)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    curve = CurveModel(cfg, model_dir, mode, fisher_uris, device)
    sets = {name: ({n: ray.get(r) for n, r in refs.items()}, kinds) for name, (refs, kinds) in groups.items()}
    points = []
    for knob in knobs:
        model = curve.at(knob)
        points.append(
            {name: score_sets(model, data, kinds, cfg.eval.batch_size, device) for name, (data, kinds) in sets.items()}
        )
    return points


@ray.remote
def _export_merge(cfg_dump: dict, model_dir: str, mode: str, knob: float, fisher_uris, out_uri: str, info: dict):
    cfg = Config.model_validate(cfg_dump)
    model = merged_model(cfg, model_dir, mode, knob, fisher_uris)
    with storage.staged_directory(out_uri, overwrite=True, marker="config.json") as d:
        load_tokenizer(cfg.model.model_copy(update={"name_or_path": model_dir, "tokenizer": None})).save_pretrained(d)
        with open(os.path.join(d, "merge.json"), "w") as f:
            json.dump(info, f, indent=1)
        model.save_pretrained(d)
    return out_uri


def _task_options(cfg: Config) -> dict:
    t = cfg.train
    return {"num_cpus": t.cpus_per_worker, "num_gpus": 1 if t.use_gpu else 0}


def submit_curve(
    cfg: Config,
    model_dir: str,
    mode: str,
    knobs: list[float],
    groups: EvalGroups,
    fisher_uris=None,
    with_test: bool = True,
) -> ray.ObjectRef:
    """Start scoring every knob's merge on the eval and validation sets (one Ray task);
    ``curve_points`` turns what it returns into points."""
    wanted = {"test": groups.test} if with_test else {}
    if groups.validation is not None:
        wanted["validation"] = groups.validation
    task = _score_curve.options(**_task_options(cfg))
    return task.remote(cfg.model_dump(), model_dir, mode, knobs, fisher_uris, wanted, cfg.train.cpus_per_worker)


def curve_points(knobs: list[float], scored: ray.ObjectRef) -> list[MergePoint]:
    return [MergePoint(k, r.get("test"), r.get("validation")) for k, r in zip(knobs, ray.get(scored))]


# ---------------------------------------------------------------- F_D, the domain Fisher


def _model_identity(model_dir: str) -> str:
    """Names, sizes and modification times of a saved model's files: a retrained model
    in the same folder is another model."""
    # Weights and config only: the model card (README.md) is rewritten after scoring.
    listing = [
        (os.path.basename(f), size)
        for f, size in storage.list_files(model_dir)
        if f.endswith((".safetensors", ".bin", "config.json"))
    ]
    if not storage.is_remote(model_dir):
        listing = [(n, s, os.path.getmtime(os.path.join(model_dir, n))) for n, s in listing]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def domain_fisher(cfg: Config, model_dir: str, uri: str | None = None) -> tuple[str, int, float]:
    """F_D of the model at ``model_dir`` on ``train.data``, kept at ``uri`` (default:
    ``domain_fisher`` beside the model): (artifact URI, tokens, wall seconds, 0 when reused).
    On object stores the model's identity is its files' names and sizes only."""
    if cfg.train.data is None:
        raise UserError("merge.mode fisher needs train.data: F_D is the domain data's Fisher")
    uri = uri or storage.join(os.path.dirname(model_dir.rstrip("/")), "domain_fisher")
    identity = f"domain Fisher of {model_dir} ({_model_identity(model_dir)}), max_tokens {cfg.merge.fisher_max_tokens}"
    if storage.exists(storage.join(uri, artifact.META)):
        meta = artifact.ArtifactMeta.read(uri)
        same_data = meta.data_description == json.loads(json.dumps(describe_source(cfg.train.data)))
        if meta.description == identity and same_data and meta.has_second_moment:
            log.info("reusing the domain Fisher at %s", uri)
            return uri, meta.tokens, 0.0
    job = cfg.model_copy(deep=True)
    job.model.name_or_path = model_dir
    job.model.tokenizer = job.model.tokenizer or model_dir
    job.stage1 = job.stage1.model_copy(
        update={
            "data": cfg.train.data,
            "output": uri,
            "overwrite": True,
            "second_moment": True,
            "svd_rank": None,
            "max_tokens": cfg.merge.fisher_max_tokens,
            "max_records": cfg.train.max_records,
            "description": identity,
            "to_object_store": False,
            "checkpoint_every_tokens": None,  # domain data: minutes, not hours
        }
    )
    start = time.monotonic()
    result = run_global_gradient(job)
    return uri, artifact.ArtifactMeta(result.meta).tokens, time.monotonic() - start


def general_fisher_uri(cfg: Config) -> str:
    uri = storage.absolute(cfg.global_gradient_source())
    meta = artifact.ArtifactMeta.read(uri)
    artifact.check_made_for(meta, load_empty_model(cfg.model), cfg.model.name_or_path, uri)  # F_G is θ0's
    if not meta.has_second_moment:
        raise UserError(
            f"merge.mode fisher needs v_G (F_G), but {uri} has none (run Stage 1 with stage1.second_moment: true)"
        )
    return uri


# ---------------------------------------------------------------- curves


def merge_curves(
    cfg: Config,
    models: dict[str, str],
    groups: EvalGroups,
    homes: dict[str, str] | None = None,
    known: dict[str, dict[float, MergePoint]] | None = None,
) -> dict[str, MergeCurve]:
    """A merge curve per trained model (run name: model directory), the curves scored
    side by side. Each run's F_D and exported merge go to its home (default: the
    folder holding its model). ``known``: points of a run already scored (its ends:
    the trained model, the base), taken as they are."""
    mc: MergeConfig = cfg.merge
    ensure_ray(cfg.ray)
    knobs = mc.knob_values()
    if groups.validation is None:
        log.warning(
            "merge: no eval.validation_sets, so no knob is chosen and nothing is exported "
            "(choosing on eval.sets would overstate the result)"
        )
    homes = {run: (homes or {}).get(run) or os.path.dirname(d.rstrip("/")) for run, d in models.items()}
    general = general_fisher_uri(cfg) if mc.mode == "fisher" else None
    fishers = {run: _fisher_pass(cfg, d, homes[run], general) for run, d in models.items()}
    start = time.monotonic()
    known = {run: (known or {}).get(run, {}) for run in models}
    todo = {run: [k for k in knobs if k not in known[run]] for run in models}
    pending = {r: submit_curve(cfg, d, mc.mode, todo[r], groups, fishers[r][0]) for r, d in models.items() if todo[r]}
    curves = {}
    for run, model_dir in models.items():
        fisher_uris, fisher_tokens, fisher_s = fishers[run]
        new = curve_points(todo[run], pending[run]) if run in pending else []
        scored = {**known[run], **{p.knob: p for p in new}}
        points = [scored[k] for k in knobs]
        chosen = _choose(run, points, mc.mode) if groups.validation is not None else None
        exported = None
        if chosen is not None and mc.export:
            validation = next(p for p in points if p.knob == chosen).validation
            out = storage.join(homes[run], "merged", "model")
            exported = export_merge(cfg, run, model_dir, mc.mode, chosen, fisher_uris, validation, out)
        curves[run] = MergeCurve(
            run,
            mc.mode,
            model_dir,
            points,
            chosen,
            exported,
            eval_tokens=len(todo[run]) * sum(groups.tokens.values()),
            fisher_tokens=fisher_tokens,
            wall_s=fisher_s + time.monotonic() - start,  # its F_D, then until its curve (and export) were done
            domain_fisher=fisher_uris[1] if fisher_uris else None,
        )
        log.info("merge %s (%s): %s", run, mc.mode, _curve_summary(curves[run]))
    return curves


def _fisher_pass(cfg: Config, model_dir: str, home: str, general: str | None) -> tuple[tuple | None, int, float]:
    """(F_G and F_D URIs, F_D's tokens, its seconds) for a fisher merge; (None, 0, 0) else."""
    if general is None:
        return None, 0, 0.0
    fd_uri, tokens, seconds = domain_fisher(cfg, model_dir, storage.join(home, "domain_fisher"))
    return (general, fd_uri), tokens, seconds


def _choose(run: str, points: list[MergePoint], mode: str) -> float | None:
    """The knob with the best validation S; ties go to the end nearer the trained model
    (larger α, smaller λ). None when no point has a validation S."""
    scored = [p for p in points if p.validation is not None and not math.isnan(p.validation["S"])]
    if not scored:
        log.warning(
            "merge %s: no point has a validation S (lm_eval-only validation sets?): nothing chosen or exported", run
        )
        return None
    return max(scored, key=lambda p: (p.validation["S"], -p.knob if mode == "fisher" else p.knob)).knob


def export_merge(
    cfg: Config, run: str, model_dir: str, mode: str, knob: float, fisher_uris, validation: dict, out: str
) -> str:
    """Save the merge at ``knob`` to ``out`` (save_pretrained), with ``merge.json``."""
    info = {
        "run": run,
        "mode": mode,
        "knob": knob,
        "trained_model": model_dir,
        "base_model": cfg.model.name_or_path,
        "domain_fisher": fisher_uris[1] if fisher_uris else None,
        "chosen_on": "validation sets",
        "validation": validation,
    }
    return ray.get(
        _export_merge.options(**_task_options(cfg)).remote(
            cfg.model_dump(), model_dir, mode, knob, fisher_uris, out, info
        )
    )


def _curve_summary(curve: MergeCurve) -> str:
    text = ", ".join(f"{p.knob:g}: S {p.test['S']:.4f}" for p in curve.points if p.test)
    if curve.chosen is not None:
        text += f"; chosen on validation: {curve.chosen:g}"
    return text


def curves_json(curves: dict[str, MergeCurve]) -> dict:
    return {run: asdict(c) for run, c in curves.items()}
