"""Stage 2: boosted annealing (or a baseline) on domain data, as a Ray Train job.

Read ``_train_loop`` top to bottom: it is the whole training step. The domain data is
read and tokenized by Ray Data, then held as two arrays in the object store; every
worker walks the same seeded permutation per epoch and takes its slice of each global
batch, so a run is reproducible and resumes exactly from a checkpoint.
"""

from __future__ import annotations

import functools
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
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from dba_ray import artifact, harness, model_card, sharding, storage, tracking
from dba_ray import checkpoint as checkpointing
from dba_ray.config import Config, DBAConfig, MethodSpec, ScheduleConfig, TrainConfig, digest
from dba_ray.curves import CurvesCallback
from dba_ray.data import build_sequences, collect_arrays
from dba_ray.data.records import read_choice_records
from dba_ray.data.tokenize import IGNORE, choice_arrays
from dba_ray.dba import DBA, gamma_at, lr_at
from dba_ray.errors import UserError, find_user_error
from dba_ray.evaluate import scores, set_metrics, set_sums
from dba_ray.global_gradient import token_loss_sum
from dba_ray.methods import as_spec, resolve, uses_global_gradient
from dba_ray.model import load_empty_model, load_model, load_tokenizer
from dba_ray.progress import ProgressPrinter, new_tracker
from dba_ray.ray_runtime import check_cpu_headroom, ensure_ray, scaling

log = logging.getLogger("dba_ray")


@dataclass
class TrainResult:
    method: str  # the run's name (a method or a named variant)
    model_dir: str  # save_pretrained output
    metrics: dict  # the last evaluation (per set, plus S_D / S_G / S)
    steps: int
    tokens: int  # trained tokens, general ones of a mixture included
    wall_s: float
    peak_mem_mb: float  # rank 0: peak GPU memory allocated, or peak RSS on CPU
    resumed_at: int  # the checkpoint's step this run continued from (0: from the start)


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


def build_model(cfg: Config, method: str, device: torch.device) -> torch.nn.Module:
    """The model a run trains, in train mode: LoRA-wrapped for ``lora``."""
    model = load_model(cfg.model).to(device)
    if method == "lora":
        model = _wrap_lora(model, cfg)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: a checkpointed block's parameters get gradients even when its
        # inputs need none, as under LoRA (frozen embeddings). transformers < 5 defaults
        # to reentrant checkpointing, where LoRA's adapters got no gradient at all.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


# ---------------------------------------------------------------- the loop


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def _global_batch_rows(step: int, n: int, global_batch: int, steps_per_epoch: int, seed: int):
    """Rows of global batch ``step``: the same on every worker and after a resume."""
    epoch, i = divmod(step, steps_per_epoch)
    return _epoch_permutation(n, seed + epoch)[i * global_batch : (i + 1) * global_batch]


def _quiet_report_log() -> None:
    """Ray Train logs each ray.train.report at INFO with its whole metrics dict; ours
    carry every step since the last report, so that line would repeat the loss curve
    into the user's console. Its logger is named after its file."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _train_loop(config: dict) -> dict:
    _quiet_report_log()
    cfg = Config.model_validate(config["cfg"])
    t = cfg.train
    dba_cfg = DBAConfig.model_validate(config["dba"])
    sched = ScheduleConfig.model_validate(config["schedule"])
    total, tracker = config["total_steps"], config["tracker"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.cpus_per_worker)
    device = ray.train.torch.get_device()

    model = build_model(cfg, config["method"], device)
    fsdp = t.parallel == "fsdp"
    if fsdp:  # before DBA: it keeps the (sharded) parameters and their shards of ĝ_G
        sharding.shard_model(model)
    dba = None
    if uses_global_gradient(dba_cfg):
        # FSDP: each rank reads only its rows of ĝ_G and v_G.
        grad = artifact.load_any(
            config["grad_source"], model=model, model_name=cfg.model.name_or_path,
            rows=sharding.local_rows(model) if fsdp else None,
        )
        # Built before any checkpoint is loaded, so the fisher anchor's θ0 is the base.
        dba = DBA(
            model.named_parameters(), grad.mean, total, dba_cfg, second_moment=grad.second_moment,
            all_reduce=sharding.all_reduce_sum if fsdp else None,
        )
        del grad
    ddp = model if fsdp else ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    opt_cfg = t.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=sched.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
    )

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # written by any number of workers, DDP or FSDP
        with checkpoint.as_directory() as d:
            step = checkpointing.load(d, model, optimizer, rank, world)["step"]
        log.info("rank %d resumed at step %d", rank, step)
    resumed_at = step

    data = ray.get(config["train_ref"])
    ids_all, labels_all = data["input_ids"], data["labels"]
    evals = {name: ray.get(ref) for name, ref in config["eval_refs"].items()}
    B, accum = t.batch_size, t.grad_accum
    global_batch = B * world * accum
    steps_per_epoch = len(ids_all) // global_batch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    history: list[dict] = []
    last_eval: dict = {}
    tokens_seen = 0  # trained tokens since this (re)start, for tokens/s
    last_push = step_end = time.monotonic()

    def evaluate() -> dict:
        out = {}
        # FSDP ranks must run the same forward passes (each gathers weights), so every
        # rank scores the whole set; DDP ranks split it.
        r, w = (0, 1) if fsdp else (rank, world)
        for name, arr in evals.items():
            sums = set_sums(model, arr, cfg.eval.batch_size, device, r, w)
            if w > 1:
                dist.all_reduce(sums)
            out[name] = set_metrics(sums)
        if fsdp:
            # With no backward to follow, the root unit keeps its weights gathered and
            # registered in place of the sharded parameters, which the optimizer, DBA
            # and the checkpoint address.
            model.reshard()
        return {"eval": out, **scores(out, config["eval_kinds"])}

    while step < total:
        rows = _global_batch_rows(step, len(ids_all), global_batch, steps_per_epoch, t.seed)
        # Normalize by the whole global batch's trained tokens: the same loss as one
        # process over the same rows (DDP then averages, hence × world).
        n_global = int((labels_all[rows][:, 1:] != IGNORE).sum())
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for a in range(accum):
            mine = rows[a * B * world : (a + 1) * B * world][rank::world]
            x = torch.from_numpy(ids_all[mine].astype(np.int64)).to(device)
            y = torch.from_numpy(labels_all[mine].astype(np.int64)).to(device)
            # FSDP reduce-scatters every micro-batch, keeping the summed gradients sharded.
            sync = a == accum - 1 or world == 1 or fsdp
            with (ddp.no_sync() if not sync else nullcontext()), (autocast or nullcontext()):
                loss, _ = token_loss_sum(ddp, x, y)
                (loss * world / max(n_global, 1)).backward()
            loss_sum += loss.detach()
        if world > 1:
            dist.all_reduce(loss_sum)
        step_loss = float(loss_sum) / max(n_global, 1)
        if not math.isfinite(step_loss):
            # Every rank sees the same reduced loss, so all stop together, cleanly,
            # before a step that would spoil the weights of the next checkpoint.
            return {"nan_at_step": step + 1, "loss": step_loss}
        if opt_cfg.grad_clip is not None:  # FSDP: DTensor grads, so the norm is global
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        stats = dba.apply(step).as_dict() if dba is not None else {"c": 1.0}
        lr = lr_at(step, total, sched) * stats["c"]
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        if dba is not None:
            dba.after_step(lr)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += n_global
        # step_s: from the previous step's end, so an evaluation or a checkpoint counts
        # in the step after it (what benchmarks/stage2_loop.py measures).
        now = time.monotonic()
        history.append({"step": step, "loss": step_loss, "lr": lr, "step_s": now - step_end, **stats})
        step_end = now
        if t.fail_once_at_step == step and rank == min(1, world - 1):
            marker = storage.join(config["run_dir"], "failed_once")
            if not storage.exists(marker):
                storage.write_bytes_atomic(marker, b"")
                raise RuntimeError(f"injected failure at step {step} (fail_once_at_step)")
        if rank == 0 and (time.monotonic() - last_push > 1.0 or step == total):
            tracker.set.remote(steps=step, loss=step_loss, tokens=tokens_seen)
            last_push = time.monotonic()

        do_eval = step == total or (t.eval_every and step % t.eval_every == 0)
        do_ckpt = step == total or (t.checkpoint_every and step % t.checkpoint_every == 0)
        if not (do_eval or do_ckpt):
            continue
        metrics = {"step": step, "loss": step_loss, "history": history}
        if do_eval:
            last_eval = evaluate()
            metrics.update(last_eval)
        history = []
        if do_ckpt:
            with tempfile.TemporaryDirectory() as d:
                # FSDP: every rank writes its rows, and Ray Train merges the directories.
                wrote = checkpointing.save(d, model, optimizer, step, {"total_steps": total}, rank, world)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if wrote else None)
        else:
            ray.train.report(metrics)

    if not last_eval and evals:
        last_eval = evaluate()  # resumed from the final checkpoint: score it anyway
    full = sharding.full_state_dict(model) if fsdp else None  # a collective: all ranks
    if rank == 0:
        with storage.staged_directory(config["model_dir"], overwrite=True, marker="config.json") as d:
            load_tokenizer(cfg.model).save_pretrained(d)
            if config["method"] == "lora":  # saved merged: a plain model that loads like any other
                model.merge_and_unload().save_pretrained(d)
            else:
                model.save_pretrained(d, state_dict=full)
    # rank 0's return value reaches the driver
    return {"final": last_eval, "peak_mem_mb": _peak_memory_mb(device), "resumed_at": resumed_at}


# ---------------------------------------------------------------- the driver


def prepare_eval(cfg: Config, sets=None) -> tuple[dict[str, ray.ObjectRef], dict[str, str]]:
    """Tokenize every eval set (or ``sets``, e.g. the validation sets) once; (object refs
    of arrays, kinds) by set name."""
    ensure_ray(cfg.ray)
    refs, kinds = {}, {}
    for s in cfg.eval.sets if sets is None else sets:
        if s.type == "lm_eval":  # scored on the saved model (dba_ray/harness.py)
            continue
        if s.type == "choice":
            records = read_choice_records(s.data)[: cfg.eval.max_sequences]
            arrays = choice_arrays(records, load_tokenizer(cfg.model), s.data.seq_len)
        else:
            seqs = build_sequences(s.data, cfg.model, concurrency=cfg.ray.tokenize_concurrency)
            arrays = collect_arrays(seqs, limit=cfg.eval.max_sequences)
        if len(arrays["input_ids"]) == 0:
            raise UserError(f"eval set {s.name!r} produced no sequences")
        refs[s.name], kinds[s.name] = ray.put(arrays), s.kind
    return refs, kinds


def prepare_train_data(cfg: Config) -> ray.ObjectRef:
    """Tokenize the domain data once, into the object store."""
    if cfg.train.data is None:
        raise UserError("train.data is required: the domain data to fine-tune on")
    ensure_ray(cfg.ray)
    arrays = collect_arrays(build_sequences(
        cfg.train.data, cfg.model, max_records=cfg.train.max_records, concurrency=cfg.ray.tokenize_concurrency
    ))
    return ray.put(arrays)


def mixture_general_count(n_domain: int, ratio: float) -> int:
    return round(n_domain * ratio / (1 - ratio))


def mixture_domain_rows(t, n_domain: int) -> np.ndarray:
    """The domain sequences a mixture run mixes with general ones: those a domain-only
    run of the same max_steps trains on (all of them past one epoch), so that the
    general share is the ratio of what is trained, not of the whole domain file."""
    global_batch = t.batch_size * t.num_workers * t.grad_accum
    steps_per_epoch = n_domain // global_batch
    if not t.max_steps or steps_per_epoch == 0 or t.max_steps >= steps_per_epoch:
        return np.arange(n_domain)
    return np.sort(_epoch_permutation(n_domain, t.seed)[: t.max_steps * global_batch])


def planned_steps(t, n_domain: int) -> int:
    """T of a domain-only run over ``n_domain`` sequences."""
    return t.max_steps or n_domain // (t.batch_size * t.num_workers * t.grad_accum) * t.epochs


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


def prepare_general_data(cfg: Config, n: int) -> ray.ObjectRef:
    """The first ``n`` general sequences for the mixture baseline, tokenized at the
    domain data's sequence length (so the two stack into one array)."""
    source = cfg.train.mixture.data or cfg.stage1.data
    if source is None:
        raise UserError("method mixture needs general data: set train.mixture.data or stage1.data")
    source = source.model_copy(update={"seq_len": cfg.train.data.seq_len})
    ensure_ray(cfg.ray)
    seqs = build_sequences(source, cfg.model, concurrency=cfg.ray.tokenize_concurrency)
    arrays = collect_arrays(seqs, limit=n)
    if len(arrays["input_ids"]) == 0:
        raise UserError(
            f"the mixture's general data {source.path or source.hf_dataset} has no sequences: "
            "point train.mixture.data (or stage1.data) at general text"
        )
    return ray.put(arrays)


def prepare_mixture_data(cfg: Config, train_ref: ray.ObjectRef, trains: list[TrainConfig]) -> ray.ObjectRef:
    """General sequences enough for every mixture run of ``trains`` (each run's own,
    resolved settings: its ratio, steps and batch decide how many it mixes in), shared."""
    n = len(ray.get(train_ref)["input_ids"])
    need = max(mixture_general_count(len(mixture_domain_rows(t, n)), t.mixture.ratio) for t in trains)
    return prepare_general_data(cfg, need)


def _mix(domain: dict, general: dict, n_general: int, name: str) -> dict:
    """Domain rows plus ``n_general`` general ones; fewer general sequences than that are
    cycled (said in the log), so the baseline exists wherever a domain run does."""
    have = len(general["input_ids"])
    if have < n_general:
        log.warning("%s: %d general sequences for a mixture that needs %d: each is used up to %d times",
                    name, have, n_general, math.ceil(n_general / have))
    picked = np.arange(n_general) % have
    return {k: np.concatenate([domain[k], general[k][picked]]) for k in ("input_ids", "labels")}


def run_train(
    cfg: Config,
    method: str | MethodSpec,
    *,
    grad_source: str | ray.ObjectRef | None = None,
    train_ref: ray.ObjectRef | None = None,
    eval_refs: tuple[dict, dict] | None = None,
    general_ref: ray.ObjectRef | None = None,
    callbacks: tuple = (),
    tracking_parent: tracking.TrackingParent | None = None,
    tracking_name: str | None = None,
) -> TrainResult:
    """Train one method (or a named variant) on the domain data; save the model under
    ``<output_dir>/<name>/model``. ``train_ref`` / ``eval_refs`` / ``general_ref`` reuse
    data already tokenized by an earlier call; ``grad_source`` overrides the configured
    artifact; ``callbacks`` are extra Ray Train callbacks (Tune's reporter);
    ``tracking_parent`` / ``tracking_name``: the group and name of its tracked run."""
    spec = as_spec(method)
    cfg = resolve(cfg, spec)
    t = cfg.train
    dba_cfg, sched = t.dba, t.schedule
    if "global_gradient" in spec.set or grad_source is None:  # a variant's own ĝ_G wins over a shared one
        grad_source = storage.absolute(cfg.global_gradient_source())
    grad_id = None  # which ĝ_G: part of the run's identity, so a new one means a new run
    grad_meta = None  # its metadata, for the model card
    if uses_global_gradient(dba_cfg):
        grad_id = grad_source.hex() if isinstance(grad_source, ray.ObjectRef) else None
        if isinstance(grad_source, str):
            meta = grad_meta = artifact.read_meta(grad_source)
            grad_id = [meta["created_at"], meta["data"]["fingerprint"], meta["global_norm"]]
            # Refused here, before any worker starts, if made for another model.
            artifact.check_made_for(meta, load_empty_model(cfg.model), cfg.model.name_or_path, grad_source)
            needs_v = dba_cfg.anchor == "fisher" or (dba_cfg.ggb and dba_cfg.boost_mode == "update")
            if needs_v and not meta.get("has_second_moment"):
                what = "anchor: fisher" if dba_cfg.anchor == "fisher" else "boost_mode: update"
                raise UserError(
                    f"{what} needs v_G, but {grad_source} has none "
                    "(run Stage 1 with stage1.second_moment: true)"
                )
    ensure_ray(cfg.ray)
    check_cpu_headroom(t.num_workers * t.cpus_per_worker)
    harness.require_harness(cfg)
    if train_ref is None:
        train_ref = prepare_train_data(cfg)
    if eval_refs is None:
        eval_refs = prepare_eval(cfg)
    arrays = ray.get(train_ref)
    max_steps = t.max_steps
    global_batch = t.batch_size * t.num_workers * t.grad_accum
    if spec.method == "mixture":
        rows = mixture_domain_rows(t, len(arrays["input_ids"]))
        n_general = mixture_general_count(len(rows), t.mixture.ratio)
        general_ref = general_ref or prepare_general_data(cfg, n_general)
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
    warning = saturation_warning(spec.name, dba_cfg, total)
    if warning:
        log.warning(warning)
    row_tokens = (arrays["labels"][:, 1:] != IGNORE).sum(axis=1)
    tokens = sum(
        int(row_tokens[_global_batch_rows(s, n, global_batch, steps_per_epoch, t.seed)].sum())
        for s in range(total)
    )
    del arrays

    out_dir = storage.absolute(cfg.output_dir)
    run_dir = storage.join(out_dir, spec.name)
    tracker = new_tracker()
    tracked = tracking.open_run(cfg, tracking_name or spec.name, "train", tracking_parent)
    if tracked is not None:
        callbacks = (tracking.TrackingCallback(tracked.actor), *callbacks)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "method": spec.method,
            "dba": dba_cfg.model_dump(),
            "schedule": sched.model_dump(),
            "total_steps": total,
            "tracker": tracker,
            "grad_source": grad_source,
            "train_ref": train_ref,
            "eval_refs": eval_refs[0],
            "eval_kinds": eval_refs[1],
            "run_dir": run_dir,
            "model_dir": storage.join(run_dir, "model"),
        },
        scaling_config=scaling(t.num_workers, t.cpus_per_worker, t.use_gpu, cfg.ray),
        run_config=RunConfig(
            # The same name and storage path resume an interrupted run; the digest of the
            # settings keeps a changed config from resuming a stale checkpoint.
            name=f"train-{spec.name}-{_settings_digest(cfg, spec, grad_id)}",
            **storage.ray_storage(storage.join(out_dir, "ray_train")),
            callbacks=[CurvesCallback(run_dir), *callbacks],
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
    )
    log.info("stage 2 (%s): %d steps of %d sequences on %d worker(s)", spec.name, total, global_batch, t.num_workers)
    start = time.monotonic()
    with ProgressPrinter(tracker, f"train {spec.name}", total, t.progress_interval_s, unit="steps"):
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
    metrics = returned.get("final", {})
    wall = time.monotonic() - start
    metrics = harness.add_final_scores(cfg, metrics, storage.join(run_dir, "model"))
    log.info("stage 2 (%s) done in %.1fs: %s", spec.name, wall, _summary(metrics))
    model_card.write_card(storage.join(run_dir, "model"), model_card.facts_for_run(
        cfg, spec, grad_meta, grad_source if uses_global_gradient(dba_cfg) else None, metrics, total, tokens))
    if tracked is not None:
        peak = returned.get("peak_mem_mb", float("nan"))
        tracked.summary(tracking.final_values({**metrics, "wall_s": wall, "tokens": tokens, "steps": total, "peak_mem_mb": peak}))
        tracked.finish()
    return TrainResult(
        method=spec.name,
        model_dir=storage.join(run_dir, "model"),
        metrics={k: metrics[k] for k in ("eval", "S_D", "S_G", "S") if k in metrics},
        steps=total,
        tokens=tokens,
        wall_s=wall,
        peak_mem_mb=returned.get("peak_mem_mb", float("nan")),
        resumed_at=returned.get("resumed_at", 0),
    )


def _settings_digest(cfg: Config, spec: MethodSpec, grad_id) -> str:
    """``cfg`` as resolved for the run: its train section is what the run trains with.
    The layout is not (workers, micro-batches, DDP or FSDP, CPUs): a run keeps its
    identity, and resumes, on another layout with the same global batch."""
    keep = cfg.model_dump(include={"model", "train"})
    t = cfg.train
    keep["train"]["global_batch"] = t.batch_size * t.num_workers * t.grad_accum
    for key in ("progress_interval_s", "max_failures", "fail_once_at_step", "batch_size", "num_workers",
                "grad_accum", "parallel", "cpus_per_worker"):
        keep["train"].pop(key)
    keep["method"] = spec.method
    keep["grad_id"] = grad_id
    return digest(keep)


def _summary(metrics: dict) -> str:
    keys = [k for k in ("S_D", "S_G", "S") if k in metrics and not math.isnan(metrics[k])]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) or "no eval sets"
