"""Evaluation sets of ``type: lm_eval``: standard benchmarks through lm-evaluation-harness.

Each saved model is scored in a Ray task (one GPU when the run trains on GPUs) with the
harness's Hugging Face backend (``HFLM``), given the model and tokenizer as loaded by
dba-ray, so a builtin model and a hub model go the same way. A set's normalized score
(``acc``, like every other set's) is the mean over its tasks of each task's counted
metric; every numeric metric the harness reports is kept beside it as
``<task>/<metric>`` (``<task>/<metric>/<filter>`` for filters other than ``none``).

lm-eval is an optional dependency: it is imported only inside the functions here.
"""

from __future__ import annotations

import logging
import math
import os

import ray
import torch

from dba_ray.config import Config, EvalSetConfig
from dba_ray.errors import UserError, find_user_error
from dba_ray.evaluate import scores
from dba_ray.model import load_model
from dba_ray.tokenizer import load_tokenizer

log = logging.getLogger("dba_ray")

INSTALL_HINT = "pip install 'dba-ray[lmeval]'"


def harness_sets(cfg: Config) -> list[EvalSetConfig]:
    return [s for s in cfg.eval.sets if s.type == "lm_eval"]


def require_harness(cfg: Config) -> None:
    """Fail on the driver, in one line, before any model is trained or scored."""
    sets = harness_sets(cfg)
    if not sets:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(
            f"eval set {sets[0].name!r} has type lm_eval, which needs lm-evaluation-harness: {INSTALL_HINT}"
        ) from None


def _label(key: str) -> tuple[str, str] | None:
    """``"acc_norm,none"`` → ("acc_norm", "none"); None for stderr and non-metric keys."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    if metric.endswith("_stderr"):
        return None
    return metric, filt


def counted_metric(task: str, results: dict, wanted: str | None) -> str:
    """The harness key (``metric,filter``) a task's score is read from."""
    keys = [k for k, v in results.items() if _label(k) and isinstance(v, (int, float))]
    if not keys:
        raise UserError(f"lm_eval task {task!r} reported no numeric metric")
    if wanted:
        match = [k for k in keys if k == wanted or _label(k)[0] == wanted]
        if not match:
            raise UserError(f"lm_eval task {task!r} has no metric {wanted!r} (it reports: {', '.join(keys)})")
        return match[0]
    return next((k for k in keys if _label(k)[0] == "acc_norm"), keys[0])


def set_metrics_from_results(s: EvalSetConfig, results: dict[str, dict]) -> dict[str, float]:
    """The set's metrics from the harness's ``results`` (task name → its metrics)."""
    out: dict[str, float] = {}
    counted = []
    for task in _task_names(s, results):
        res = results[task]
        key = counted_metric(task, res, s.metrics.get(task))
        counted.append(float(res[key]))
        for k, v in res.items():
            label = _label(k)
            if label and isinstance(v, (int, float)):
                metric, filt = label
                out[f"{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(v)
    return {"acc": sum(counted) / len(counted), **out}


def _task_names(s: EvalSetConfig, results: dict) -> list[str]:
    """The names the harness reports ``s.tasks`` under (a YAML path reports its `task:`)."""
    names = []
    for spec in s.tasks:
        if spec in results:
            names.append(spec)
            continue
        name = _yaml_task_name(spec)
        if name is None or name not in results:
            raise UserError(f"eval set {s.name!r}: the harness reported no results for task {spec!r}")
        names.append(name)
    return names


def _yaml_task_name(spec: str) -> str | None:
    if not spec.endswith((".yaml", ".yml")):
        return None
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(spec, resolve_func=False, recursive=False)
    except (OSError, ValueError) as e:
        raise UserError(f"lm_eval task file {spec}: {e}") from None
    return config.get("task") or config.get("group")


def run_harness(model, tokenizer, s: EvalSetConfig, batch_size: int) -> dict[str, float]:
    """Score one lm_eval set on a loaded model (already on its device)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for spec in s.tasks:
        if spec.endswith((".yaml", ".yml")) and not os.path.isfile(spec):
            raise UserError(f"eval set {s.name!r}: task file not found: {spec}")
    limit = None if s.limit is None else (int(s.limit) if s.limit >= 1 else s.limit)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # Indexing the harness's own tasks reads hundreds of YAML files (most of a minute
    # on a busy machine); only task names need that index, YAML paths do not.
    named = any(not t.endswith((".yaml", ".yml")) for t in s.tasks)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(s.tasks),
            num_fewshot=s.num_fewshot,
            limit=limit,
            task_manager=TaskManager(include_defaults=named),
            log_samples=False,
        )
    except (KeyError, FileNotFoundError, ConnectionError) as e:
        # An unknown task name, a missing data file, or hub data with no network.
        raise UserError(f"eval set {s.name!r}: lm_eval could not load its tasks: {' '.join(str(e).split())}") from None
    return set_metrics_from_results(s, out["results"])


@ray.remote
def _score_remote(cfg_dump: dict, model_path: str, threads: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(threads)
    cfg = Config.model_validate(cfg_dump)
    cfg.model.name_or_path = model_path
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg.model).to(device).eval()
    tokenizer = load_tokenizer(cfg.model)
    return {s.name: run_harness(model, tokenizer, s, cfg.eval.batch_size) for s in harness_sets(cfg)}


def submit(cfg: Config, models: dict[str, str]) -> dict[str, ray.ObjectRef]:
    """Start scoring each model (name: path) on the lm_eval sets; {} when there are none."""
    if not harness_sets(cfg):
        return {}
    require_harness(cfg)
    t = cfg.train
    task = _score_remote.options(num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0)
    return {name: task.remote(cfg.model_dump(), path, t.cpus_per_worker) for name, path in models.items()}


def fetch(ref: ray.ObjectRef) -> dict[str, dict[str, float]]:
    """A scoring task's result; a user error inside it comes out as itself, one line
    (Ray's copy of it carries the remote traceback in its text)."""
    try:
        return ray.get(ref)
    except Exception as e:
        user = find_user_error(e)
        if user is not None:
            raise user from None
        raise


def combine(cfg: Config, metrics: dict[str, dict], harness: dict[str, dict]) -> dict:
    """Every set's metrics in config order, and S_D / S_G / S over all of them."""
    merged = {**metrics, **harness}
    ordered = {s.name: merged[s.name] for s in cfg.eval.sets if s.name in merged}
    kinds = {s.name: s.kind for s in cfg.eval.sets if s.name in merged}
    return {"eval": ordered, **scores(ordered, kinds)}


def add_final_scores(cfg: Config, metrics: dict, model_dir: str) -> dict:
    """A finished training run's last evaluation plus its saved model's lm_eval sets."""
    if not harness_sets(cfg):
        return metrics
    scored = fetch(submit(cfg, {"model": model_dir})["model"])
    out = combine(cfg, metrics.get("eval", {}), scored)
    log.info(
        "lm_eval sets of %s: %s",
        model_dir,
        ", ".join(f"{n} {m['acc']:.4f}" for n, m in scored.items() if not math.isnan(m["acc"])),
    )
    return out
