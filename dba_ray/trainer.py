"""Stage 2: boosted annealing (or a baseline) on domain data, as a Ray Train job.

Read ``_train_loop`` top to bottom: setup, resume, the step, evaluate, checkpoint,
export, each a named helper; DDP and FSDP differ only behind ``dba_ray.parallel``.
The domain data is read and tokenized by Ray Data, then held as two arrays in the
object store (``dba_ray.data.arrays``; a command's runs share what ``dba_ray.prepare``
made); every worker walks the same seeded permutation per epoch and takes its slice of
each global batch (``dba_ray.data.order``), so a run is reproducible and resumes exactly
from a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution import context as train_context

from dba_ray import artifact, console, harness, model_card, parallel, sharding, storage, tracking, vocab
from dba_ray import checkpoint as checkpointing
from dba_ray.config import Config, DBAConfig, MethodSpec, digest
from dba_ray.curves import CurvesCallback
from dba_ray.data.arrays import EvalData, tokenize_eval, tokenize_general, tokenize_train
from dba_ray.data.order import global_batch_rows, mixture_domain_rows, mixture_general_count
from dba_ray.data.tokenize import IGNORE
from dba_ray.dba import DBA, gamma_at, lr_at
from dba_ray.errors import UserError, find_user_error
from dba_ray.evaluate import scores, set_metrics, set_sums
from dba_ray.loss import token_loss_sum
from dba_ray.methods import as_spec, config_for_run, phase_name, uses_global_gradient
from dba_ray.model import load_empty_model, load_model
from dba_ray.parallel import DDP, FSDP
from dba_ray.progress import ProgressPrinter, new_tracker
from dba_ray.ray_runtime import LeanTorchTrainer, check_fits, ensure_ray, scaling
from dba_ray.tokenizer import load_tokenizer

log = logging.getLogger("dba_ray")


@dataclass
class TrainResult:
    run_name: str  # the run's name (a method or a named variant)
    model_dir: str  # save_pretrained output
    metrics: dict  # the last evaluation (per set, plus S_D / S_G / S)
    steps: int
    tokens: int  # trained tokens, general ones of a mixture included
    wall_s: float
    peak_mem_mb: float  # rank 0: peak GPU memory allocated, or peak RSS on CPU
    resumed_at: int  # the checkpoint's step this run continued from (0: from the start)
    weights_read: str  # how rank 0 got the base weights: only its rows, or the whole model


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _wrap_lora(model, cfg: Config):
    """peft adapters on the base model; the base weights are frozen."""
    try:
        import peft
    except ImportError:
        raise UserError("method lora needs peft: pip install 'dba-ray[lora]'") from None
    lc = cfg.train.lora
    torch.manual_seed(cfg.train.seed)  # adapter init
    config = peft.LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules, task_type="CAUSAL_LM"
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules this architecture does not have
        raise UserError(f"train.lora: {' '.join(str(e).split())}") from None


def build_model(cfg: Config, method: str, layout: DDP | FSDP, device: torch.device) -> tuple[torch.nn.Module, bool]:
    """The model a run trains, sharded as ``layout`` shards it, in train mode:
    LoRA-wrapped for ``lora``; and whether each rank read only its rows. Under fsdp a
    rank reads only its rows of a saved model's safetensors (``sharding.load_sharded``):
    at 70B no worker ever holds the whole model. LoRA wraps the whole model first."""
    if isinstance(layout, FSDP) and method != "lora":
        model, rows_only = sharding.load_sharded(cfg.model, device)
    else:
        model, rows_only = load_model(cfg.model).to(device), False
        if method == "lora":
            model = _wrap_lora(model, cfg)
        layout.shard(model)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: a checkpointed block's parameters get gradients even when its
        # inputs need none, as under LoRA (frozen embeddings). transformers < 5 defaults
        # to reentrant checkpointing, where LoRA's adapters got no gradient at all.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, rows_only


# ---------------------------------------------------------------- the loop
#
# One worker's run, as a recipe: _setup (model, layout, DBA, optimizer, data), _resume,
# then per step _forward_backward and _optimizer_step, with _evaluate and _report
# (and a checkpoint) at their intervals, and _export at the end.


def _quiet_report_log() -> None:
    """Ray Train logs each ray.train.report at INFO with its whole metrics dict; ours
    carry every step since the last report, so that line would repeat the loss curve
    into the user's console. Its logger is named after its file."""
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


@dataclass
class _Worker:
    """What one Stage 2 worker trains with, built once by ``_setup``."""

    cfg: Config  # resolved for the run: its train section is what it trains with
    method: str
    rank: int
    world: int
    device: torch.device
    layout: DDP | FSDP
    rows_only: bool  # each rank read only its rows of the weights (build_model)
    model: torch.nn.Module  # its parameters (sharded under FSDP) are what the optimizer, DBA and checkpoints address
    forward_model: torch.nn.Module  # what forward and backward run through (DDP's wrapper, or the model)
    optimizer: torch.optim.Optimizer
    dba: DBA | None
    total: int  # T
    ids: np.ndarray  # the training sequences
    labels: np.ndarray
    evals: dict[str, dict]  # eval set name -> arrays
    eval_kinds: dict[str, str]

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.batch_size * self.world * t.grad_accum


def _setup(config: dict) -> _Worker:
    cfg = Config.model_validate(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.cpus_per_worker)
    device = ray.train.torch.get_device()
    layout = parallel.layout(t.parallel, rank, world)
    # Sharded before DBA is built: it keeps the (sharded) parameters and their shards of ĝ_G.
    model, rows_only = build_model(cfg, config["method"], layout, device)
    # Built before any checkpoint is loaded, so the fisher anchor's θ0 is the base.
    dba = _build_dba(cfg, model, layout, config["grad_source"], config["total_steps"])
    forward_model = layout.wrap(model)
    o = t.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.schedule.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    data = ray.get(config["train_ref"])
    return _Worker(
        cfg=cfg,
        method=config["method"],
        rank=rank,
        world=world,
        device=device,
        layout=layout,
        rows_only=rows_only,
        model=model,
        forward_model=forward_model,
        optimizer=optimizer,
        dba=dba,
        total=config["total_steps"],
        ids=data["input_ids"],
        labels=data["labels"],
        evals={name: ray.get(ref) for name, ref in config["eval_refs"].items()},
        eval_kinds=config["eval_kinds"],
    )


def _build_dba(cfg: Config, model, layout: DDP | FSDP, grad_source, total: int) -> DBA | None:
    d = cfg.train.dba
    if not uses_global_gradient(d):
        return None
    grad = artifact.load_any(grad_source, model=model, model_name=cfg.model.name_or_path, rows=layout.grad_rows(model))
    return DBA(
        model.named_parameters(),
        grad.mean,
        total,
        d,
        second_moment=grad.second_moment,
        all_reduce=layout.stats_all_reduce,
    )


def _resume(w: _Worker) -> int:
    """The step to start from: that of the run's last checkpoint, restored, or 0."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:  # written by any number of workers, DDP or FSDP
        step = checkpointing.load(d, w.model, w.optimizer, w.rank, w.world)["step"]
    log.info("rank %d resumed at step %d", w.rank, step)
    return step


def _forward_backward(w: _Worker, step: int) -> tuple[float, int]:
    """Gradients of global batch ``step`` summed into .grad; (its mean loss, its
    trained tokens), the same on every rank."""
    t = w.cfg.train
    B, accum, world = t.batch_size, t.grad_accum, w.world
    steps_per_epoch = len(w.ids) // w.global_batch
    rows = global_batch_rows(step, len(w.ids), w.global_batch, steps_per_epoch, t.seed)
    # Normalize by the whole global batch's trained tokens: the same loss as one
    # process over the same rows (DDP then averages, hence × world).
    n_global = int((w.labels[rows][:, 1:] != IGNORE).sum())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if w.device.type == "cuda" else nullcontext()
    loss_sum = torch.zeros((), dtype=torch.float64, device=w.device)
    for a in range(accum):
        mine = rows[a * B * world : (a + 1) * B * world][w.rank :: world]
        x = torch.from_numpy(w.ids[mine].astype(np.int64)).to(w.device)
        y = torch.from_numpy(w.labels[mine].astype(np.int64)).to(w.device)
        with w.layout.micro_batch(w.forward_model, last=a == accum - 1), autocast:
            loss, _ = token_loss_sum(w.forward_model, x, y)
            (loss * world / max(n_global, 1)).backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
    return float(loss_sum) / max(n_global, 1), n_global


def _optimizer_step(w: _Worker, step: int) -> tuple[float, dict]:
    """Clip g_D, apply DBA (GGB, DC), set the AL learning rate × c_t, step AdamW;
    (the learning rate, the DBA statistics)."""
    t = w.cfg.train
    if t.optimizer.grad_clip is not None:  # FSDP: DTensor grads, so the norm is global
        torch.nn.utils.clip_grad_norm_(w.model.parameters(), t.optimizer.grad_clip)
    stats = w.dba.apply(step).as_dict() if w.dba is not None else {"c": 1.0}
    lr = lr_at(step, w.total, t.schedule) * stats["c"]
    for g in w.optimizer.param_groups:
        g["lr"] = lr
    w.optimizer.step()
    if w.dba is not None:
        w.dba.after_step(lr)
    w.optimizer.zero_grad(set_to_none=True)
    return lr, stats


def _evaluate(w: _Worker) -> dict:
    """Every eval set's metrics and S_D / S_G / S, the same on every rank."""
    out = {}
    r, n = w.layout.eval_split()
    for name, arrays in w.evals.items():
        sums = set_sums(w.model, arrays, w.cfg.eval.batch_size, w.device, r, n)
        if n > 1:
            dist.all_reduce(sums)
        out[name] = set_metrics(sums)
    w.layout.after_eval(w.model)
    return {"eval": out, **scores(out, w.eval_kinds)}


def _report(w: _Worker, step: int, metrics: dict, checkpoint: bool) -> None:
    """Report ``metrics`` to Ray Train, with a checkpoint of ``step`` if asked."""
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        # FSDP: every rank writes its rows, and Ray Train merges the directories.
        wrote = checkpointing.save(d, w.model, w.optimizer, step, {"total_steps": w.total}, w.rank, w.world)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if wrote else None)


def _export(w: _Worker, model_dir: str) -> None:
    """save_pretrained the trained model (LoRA merged into its base) on rank 0."""
    full = w.layout.full_state_dict(w.model)  # under FSDP a collective: all ranks
    if w.rank != 0:
        return
    with storage.staged_directory(model_dir, overwrite=True, marker="config.json") as d:
        load_tokenizer(w.cfg.model).save_pretrained(d)
        if w.method == "lora":  # saved merged: a plain model that loads like any other
            w.model.merge_and_unload().save_pretrained(d)
        else:
            w.model.save_pretrained(d, state_dict=full)


# Tests only (``fail_once_at_step`` in tests/conftest.py): when this variable names a
# file that exists, holding {"fail_once_at_step": n}, rank 1 (or 0) of each Stage 2 run
# raises once at step n; a marker in the run's folder keeps it to once per run. A file,
# not the variable's value, because a Ray worker's environment is fixed when it starts.
FAULTS_ENV = "DBA_RAY_FAULTS"


def _injected_failure_step() -> int | None:
    path = os.environ.get(FAULTS_ENV)
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["fail_once_at_step"]


def _fail_once(w: _Worker, step: int, run_dir: str) -> None:
    """Testing fault tolerance: rank 1 (or 0) raises once per run (a marker in its folder)."""
    if w.rank != min(1, w.world - 1):
        return
    marker = storage.join(run_dir, "failed_once")
    if not storage.exists(marker):
        storage.write_bytes_atomic(marker, b"")
        raise RuntimeError(f"injected failure at step {step} ({FAULTS_ENV})")


def _train_loop(config: dict) -> dict:
    _quiet_report_log()
    w = _setup(config)
    t = w.cfg.train
    step = resumed_at = _resume(w)
    fail_at = _injected_failure_step()
    history: list[dict] = []  # per-step statistics since the last report
    last_eval: dict = {}
    tokens_seen = 0  # trained tokens since this (re)start, for tokens/s
    last_push = step_end = time.monotonic()
    while step < w.total:
        step_loss, n_tokens = _forward_backward(w, step)
        if not math.isfinite(step_loss):
            # Every rank sees the same reduced loss, so all stop together, cleanly,
            # before a step that would spoil the weights of the next checkpoint.
            return {"nan_at_step": step + 1, "loss": step_loss}
        lr, stats = _optimizer_step(w, step)
        step += 1
        tokens_seen += n_tokens
        # step_s: from the previous step's end, so an evaluation or a checkpoint counts
        # in the step after it (what benchmarks/stage2_loop.py measures).
        now = time.monotonic()
        history.append({"step": step, "loss": step_loss, "lr": lr, "step_s": now - step_end, **stats})
        step_end = now
        if step == fail_at:
            _fail_once(w, step, config["run_dir"])
        if w.rank == 0 and (time.monotonic() - last_push > 1.0 or step == w.total):
            config["tracker"].set.remote(steps=step, loss=step_loss, tokens=tokens_seen)
            last_push = time.monotonic()

        do_eval = step == w.total or (t.eval_every and step % t.eval_every == 0)
        do_ckpt = step == w.total or (t.checkpoint_every and step % t.checkpoint_every == 0)
        if do_eval or do_ckpt:
            metrics = {"step": step, "loss": step_loss, "history": history}
            if do_eval:
                last_eval = _evaluate(w)
                metrics.update(last_eval)
            history = []
            _report(w, step, metrics, checkpoint=do_ckpt)

    if not last_eval and w.evals:
        last_eval = _evaluate(w)  # resumed from the final checkpoint: score it anyway
    _export(w, config["model_dir"])
    # rank 0's return value reaches the driver
    return {
        "final": last_eval,
        "peak_mem_mb": _peak_memory_mb(w.device),
        "resumed_at": resumed_at,
        "weights_read": "own rows" if w.rows_only else "whole model",
    }


# ---------------------------------------------------------------- the driver


def saturation_warning(name: str, d: DBAConfig, total: int) -> str | None:
    """A line when γ_t sits at gamma_max for more than a tenth of the steps: there the
    optimizer sees mostly ĝ_G, a fixed direction, step after step."""
    if not d.ggb or d.gamma_max == 0:
        return None
    k = sum(gamma_at(s, total, d.boost, d.gamma_max) >= d.gamma_max for s in range(total))
    if 10 * k <= total:
        return None
    return (
        f"{name}: γ_t sits at gamma_max {d.gamma_max:g} for {k} of {total} steps (boost {d.boost:g}), "
        f"so those steps follow the fixed ĝ_G; train longer (T well above dba.boost), "
        f"lower dba.boost, or cap dba.gamma_max"
    )


def _mix(domain: dict, general: dict, n_general: int, name: str) -> dict:
    """Domain rows plus ``n_general`` general ones; fewer general sequences than that are
    cycled (said in the log), so the baseline exists wherever a domain run does."""
    have = len(general["input_ids"])
    if have < n_general:
        log.warning(
            "%s: %d general sequences for a mixture that needs %d: each is used up to %d times",
            name,
            have,
            n_general,
            math.ceil(n_general / have),
        )
    picked = np.arange(n_general) % have
    return {k: np.concatenate([domain[k], general[k][picked]]) for k in ("input_ids", "labels")}


def _make_trainer(
    cfg: Config,
    spec: MethodSpec,
    plan,
    grad,
    grad_source,
    eval_refs: EvalData,
    tracker,
    run_dir: str,
    callbacks: tuple,
    in_tune_trial: bool,
) -> TorchTrainer:
    """The Ray Train trainer of one Stage 2 run: what every worker's loop is handed, and
    the run's scaling, storage and callbacks."""
    t = cfg.train
    return LeanTorchTrainer(
        _train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "method": spec.method,
            "total_steps": plan.total,
            "tracker": tracker,
            "grad_source": grad_source,
            "train_ref": plan.train_ref,
            "eval_refs": eval_refs.refs,
            "eval_kinds": eval_refs.kinds,
            "run_dir": run_dir,
            "model_dir": storage.join(run_dir, "model"),
        },
        scaling_config=scaling(t.num_workers, t.cpus_per_worker, t.use_gpu, cfg.ray),
        run_config=_run_config(cfg, spec, grad.identity, (CurvesCallback(run_dir), *callbacks)),
        in_tune_trial=in_tune_trial,
    )


def run_train(
    cfg: Config,
    method: str | MethodSpec,
    *,
    grad_source: str | ray.ObjectRef | None = None,
    train_ref: ray.ObjectRef | None = None,
    eval_refs: EvalData | None = None,
    general_ref: ray.ObjectRef | None = None,
    callbacks: tuple = (),
    tracking_parent: tracking.TrackingParent | None = None,
    tracking_name: str | None = None,
    tracker=None,
    in_tune_trial: bool = False,
) -> TrainResult:
    """Train one method (or a named variant) on the domain data; save the model under
    ``<output_dir>/<name>/model``. ``train_ref`` / ``eval_refs`` / ``general_ref`` reuse
    data already tokenized (``Prepared.run_train_data()``); without them the run tokenizes
    its own; ``grad_source`` overrides the configured
    artifact; ``callbacks`` are extra Ray Train callbacks (Tune's reporter);
    ``tracking_parent`` / ``tracking_name``: the group and name of its tracked run;
    ``tracker``: a Tracker whose owner shows the run's progress (a sweep's driver reads
    its trials'), else this process prints it; ``in_tune_trial``: the run is a Tune trial
    (LeanTorchTrainer: Tune may kill it)."""
    spec = as_spec(method)
    cfg = config_for_run(cfg, spec)
    t = cfg.train
    if "global_gradient" in spec.set or grad_source is None:  # a variant's own ĝ_G wins over a shared one
        grad_source = storage.absolute(cfg.global_gradient_source())
    grad = _check_global_gradient(cfg, grad_source)
    ensure_ray(cfg.ray)
    check_fits(phase_name(spec), "train", t, cfg.ray)
    harness.require_harness(cfg)
    if train_ref is None:
        train_ref = tokenize_train(cfg)
    if eval_refs is None:
        eval_refs = tokenize_eval(cfg)
    plan = _plan(cfg, spec, train_ref, general_ref, grad_source)

    run_dir = storage.join(storage.absolute(cfg.output_dir), spec.name)
    printed_here = tracker is None
    if printed_here:
        tracker = new_tracker()
    tracker.set.remote(steps_total=plan.total)
    tracked = tracking.open_run(cfg, tracking_name or spec.name, "train", tracking_parent)
    if tracked is not None:
        callbacks = (tracking.TrackingCallback(tracked.actor), *callbacks)
    trainer = _make_trainer(cfg, spec, plan, grad, grad_source, eval_refs, tracker, run_dir, callbacks, in_tune_trial)
    log.info(
        "stage 2 (%s): %d steps of %d sequences on %d worker(s)",
        spec.name,
        plan.total,
        plan.global_batch,
        t.num_workers,
    )
    start = time.monotonic()
    progress = ProgressPrinter(tracker, f"train {spec.name}", plan.total, t.progress_interval_s, unit="steps")
    returned = _fit(trainer, spec, tracked, progress if printed_here else nullcontext())
    wall = time.monotonic() - start
    metrics = harness.add_final_scores(cfg, returned.get("final", {}), storage.join(run_dir, "model"))
    log.info("stage 2 (%s) done in %.1fs: %s", spec.name, wall, score_summary(metrics))
    peak = returned.get("peak_mem_mb", float("nan"))
    _record(cfg, spec, plan, grad, grad_source, run_dir, metrics, wall, peak, tracked)
    return TrainResult(
        run_name=spec.name,
        model_dir=storage.join(run_dir, "model"),
        metrics={k: metrics[k] for k in ("eval", "S_D", "S_G", "S") if k in metrics},
        steps=plan.total,
        tokens=plan.tokens,
        wall_s=wall,
        peak_mem_mb=peak,
        resumed_at=returned.get("resumed_at", 0),
        weights_read=returned.get("weights_read", "not reported"),
    )


def _record(cfg, spec, plan, grad, grad_source, run_dir: str, metrics: dict, wall: float, peak: float, tracked) -> None:
    """What a finished run leaves besides its model: the model card, and its tracked
    run's final values."""
    model_card.write_card(
        storage.join(run_dir, "model"),
        model_card.facts_for_run(
            cfg, spec, grad.meta, grad_source if grad.used else None, metrics, plan.total, plan.tokens
        ),
    )
    if tracked is not None:
        tracked.summary(
            tracking.final_values(
                {**metrics, "wall_s": wall, "tokens": plan.tokens, "steps": plan.total, "peak_mem_mb": peak}
            )
        )
        tracked.finish()


@dataclass
class _GradCheck:
    used: bool  # whether the run uses ĝ_G at all
    identity: object  # which ĝ_G: part of the run's identity, so a new one means a new run
    meta: artifact.ArtifactMeta | None  # its metadata, for the model card


def _check_global_gradient(cfg: Config, grad_source) -> _GradCheck:
    """Refuse, before any worker starts, an artifact made for another model or lacking
    the v_G the run needs."""
    d = cfg.train.dba
    if not uses_global_gradient(d):
        return _GradCheck(used=False, identity=None, meta=None)
    if not isinstance(grad_source, str):  # an ObjectRef: made in this driver, for this model
        return _GradCheck(used=True, identity=grad_source.hex(), meta=None)
    meta = artifact.ArtifactMeta.read(grad_source)
    artifact.check_made_for(meta, load_empty_model(cfg.model), cfg.model.name_or_path, grad_source)
    needs_v = d.anchor == "fisher" or (d.ggb and d.boost_mode == "update")
    if needs_v and not meta.has_second_moment:
        what = "anchor: fisher" if d.anchor == "fisher" else "boost_mode: update"
        raise UserError(f"{what} needs v_G, but {grad_source} has none (run Stage 1 with stage1.second_moment: true)")
    return _GradCheck(used=True, identity=meta.identity, meta=meta)


@dataclass
class _Plan:
    train_ref: ray.ObjectRef  # what the workers train on (a mixture's general rows included)
    total: int  # T
    tokens: int  # trained tokens over the T steps
    global_batch: int


def _plan(
    cfg: Config, spec: MethodSpec, train_ref: ray.ObjectRef, general_ref: ray.ObjectRef | None, grad_source
) -> _Plan:
    """The training rows (a mixture adds its general ones), T and the tokens it trains."""
    t = cfg.train
    arrays = ray.get(train_ref)
    max_steps = t.max_steps
    global_batch = t.batch_size * t.num_workers * t.grad_accum
    if spec.method == "mixture":
        rows = mixture_domain_rows(t, len(arrays["input_ids"]))
        n_general = mixture_general_count(len(rows), t.mixture.ratio)
        general_ref = general_ref or tokenize_general(cfg, n_general)
        arrays = _mix({k: v[rows] for k, v in arrays.items()}, ray.get(general_ref), n_general, spec.name)
        train_ref = ray.put(arrays)
        if max_steps:  # max_steps counts domain steps: every method sees as much domain data
            max_steps = math.ceil(max_steps / (1 - t.mixture.ratio))
    n = len(arrays["input_ids"])
    steps_per_epoch = n // global_batch
    if steps_per_epoch == 0:
        raise UserError(
            f"domain data has {n} sequences, fewer than one global batch of {global_batch} "
            "(batch_size × num_workers × grad_accum)"
        )
    total = max_steps or steps_per_epoch * t.epochs
    row_tokens = (arrays["labels"][:, 1:] != IGNORE).sum(axis=1)
    streamed = np.zeros(n, dtype=bool)  # the rows the T steps train on, in the run's data order
    tokens = 0
    for s in range(total):
        rows = global_batch_rows(s, n, global_batch, steps_per_epoch, t.seed)
        tokens += int(row_tokens[rows].sum())
        streamed[rows] = True
    for warning in (
        saturation_warning(spec.name, t.dba, total),
        _coverage_warning(cfg, spec, grad_source, arrays, streamed),
    ):
        if warning:
            log.warning(warning)
    return _Plan(train_ref=train_ref, total=total, tokens=tokens, global_batch=global_batch)


def _coverage_warning(cfg: Config, spec: MethodSpec, grad_source, arrays: dict, streamed: np.ndarray) -> str | None:
    """vocab.coverage_warning for this run, reading ĝ_G's embedding only when it applies."""
    if not vocab.applies(cfg.train.dba):
        return None
    model = load_empty_model(cfg.model)
    size = model.get_input_embeddings().weight.shape[0]
    moved = vocab.general_rows(grad_source, vocab.input_embedding_name(model), size)
    domain = vocab.touched_ids(arrays["input_ids"][streamed], arrays["labels"][streamed])
    return vocab.coverage_warning(spec.name, moved, size, domain)


def _run_config(cfg: Config, spec: MethodSpec, grad_id, callbacks: tuple) -> RunConfig:
    t = cfg.train
    return RunConfig(
        # The same name and storage path resume an interrupted run; the digest of the
        # settings keeps a changed config from resuming a stale checkpoint.
        name=f"train-{spec.name}-{_settings_digest(cfg, spec, grad_id)}",
        **storage.ray_storage(storage.join(storage.absolute(cfg.output_dir), "ray_train")),
        callbacks=list(callbacks),
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        logging_config=LoggingConfig(log_level=console.train_log_level()),
    )


def _fit(trainer: TorchTrainer, spec: MethodSpec, tracked, progress) -> dict:
    """Run the job inside ``progress`` (its progress lines); rank 0's return value. A
    user's error inside a worker, or a loss that became NaN, ends it with one line."""
    with progress:
        try:
            result = trainer.fit()
        except Exception as e:
            if tracked is not None:
                tracked.finish(ok=False)
            user = find_user_error(e)
            if user is not None:
                raise user from None
            raise
    returned = result.return_value or {}
    if "nan_at_step" in returned:
        if tracked is not None:
            tracked.finish(ok=False)
        ckpt = result.checkpoint.path if result.checkpoint else "none yet"
        raise UserError(
            f"training {spec.name} stopped: the loss became {returned['loss']} at step "
            f"{returned['nan_at_step']}; last good checkpoint: {ckpt} (lower the learning rate?)"
        )
    return returned


def _settings_digest(cfg: Config, spec: MethodSpec, grad_id) -> str:
    """``cfg`` as resolved for the run: its train section is what the run trains with.
    The layout is not (workers, micro-batches, DDP or FSDP, CPUs): a run keeps its
    identity, and resumes, on another layout with the same global batch."""
    keep = cfg.model_dump(include={"model", "train"})
    t = cfg.train
    keep["train"]["global_batch"] = t.batch_size * t.num_workers * t.grad_accum
    for key in (
        "progress_interval_s",
        "max_failures",
        "batch_size",
        "num_workers",
        "grad_accum",
        "parallel",
        "cpus_per_worker",
    ):
        keep["train"].pop(key)
    keep["method"] = spec.method
    keep["grad_id"] = grad_id
    return digest(keep)


def score_summary(metrics: dict) -> str:
    """e.g. ``S_D 0.5966, S_G 0.3887, S 0.4707``: the scores ``metrics`` has."""
    keys = [k for k in ("S_D", "S_G", "S") if k in metrics and not math.isnan(metrics[k])]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) or "no eval sets"
