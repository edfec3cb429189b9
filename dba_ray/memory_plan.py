"""The memory plan: each phase's peak memory per worker, from the model's shapes alone
(the model built on the meta device: no weights read). Plain arithmetic: no Ray here;
``dba_ray/preflight.py`` compares it with the workers' memory, ``dba-ray plan`` prints it.

Notation: P parameters (tied ones once), b bytes per weight (4 fp32, 2 bf16/fp16), N
workers, P/N a rank's FSDP2 shard (its dim-0 rows as ``torch.chunk`` splits them, so
rank 0 holds the most), U the gathered FSDP units (the root's, i.e. embeddings, final
norm and output layer, stays gathered from forward to backward; plus two transformer
blocks: the one running and the one prefetched), T trainable parameters (P, or LoRA's
adapters). Each phase is a few moments; a worker's peak is its largest moment plus
``PROCESS_OVERHEAD``.

- Stage 1, ddp: bP weights + bP gradient + 4P fp32 sums (a buffer of their own with
  ``second_moment`` or non-fp32 weights; else ``.grad`` is the sum) + 4P v_G sums +
  activations. At the end rank 0 also holds the fp32 mean (and v_G mean), 4P (+4P), and
  one artifact file's bytes twice while writing it (at most 2 × 2 GiB: safetensors
  builds the file in a buffer of its own, then copies it into the bytes that are hashed
  and written).
- Stage 1, fsdp: b·P/N weights + bU gathered + b·P/N gradient + the largest unit's
  unsharded gradient (reduce-scatter) + 4P/N sums (+4P/N) + activations; each rank
  writes its rows: 4P/N (+4P/N) at the end, and one file of them twice. Loading:
  b·P/N and one tensor's rows when a rank reads only its rows
  (``sharding.reads_own_rows``), else the whole bP.
- Stage 1 checkpoints (``checkpoint_every_tokens``): the sums a rank holds (all of
  them on ddp's rank 0), copied to the CPU and serialized again: 2 × 4P (+4P), /N
  under fsdp.
- Stage 2: loaded as Stage 1 loads (under fsdp each rank reads its rows when it can;
  LoRA's runs load the whole model); weights, gradients (+ DDP's buckets, another bT,
  above one worker), AdamW's two moments (2bT, in the weights' dtype), ĝ_G (P ×
  ``dba.grad_dtype``), for ``boost_mode: update`` the per-weight step ĝ_G/√v_G (the same again), for the fisher
  anchor its weights v_G/mean (4P) and θ0 (bP); all /N under fsdp, plus bU and the
  unit's gradient. Moments: forward/backward, the optimizer step (on GPU foreach AdamW
  allocates one more bT; on CPU it steps tensor by tensor), the checkpoint (gradients
  freed; CPU copies of the rank's weights and AdamW moments, 3bT, the whole model's on
  ddp's rank 0), evaluation (no gradients), export (under fsdp the whole model
  gathered on rank 0's CPU, bP).
- Evaluation and merge tasks: one process, the whole model (a merge also holds the
  base when it is the builtin model, and a few fp32 copies of the largest tensor).

Activations of one micro-batch (batch × seq_len tokens), per token, in the forward's
dtype a (b; bf16 under Stage 2's GPU autocast). A Llama-style decoder layer saves, for
backward (counted with torch's saved-tensor hooks on transformers 5's Llama and Qwen2):
two RMSNorms' fp32 input and normalized output, (4 + a)·h each; attention 4·q + 2·kv
values (q = heads × head_dim, kv = kv_heads × head_dim: q, k, v, the output and its
copy for o_proj) plus 4 bytes × heads for the softmax statistics; the MLP 4·f values
(gate, up, SiLU(gate), their product). That is
``layer = 2(4 + a)h + a(4q + 2kv + 4f) + 4·heads`` bytes. The loss adds three fp32
copies of the logits, 12·V bytes (the lm_head output, its flattened copy, log-softmax;
then their gradients), at the start of backward. So:

    no checkpointing: tokens × (L · layer · s + (4 + a)h + max(12V, layer · s))
    gradient checkpointing: tokens × (L · 2ah + (4 + a)h + max(12V, layer · s))

where s is ``HEAP_SLACK`` on CPU (1 on GPU); on CPU every moment after the first
backward also carries one micro-batch's activations, the heap glibc keeps. Evaluation keeps no graph: tokens ×
max(logit bytes, layer · s). Fused attention (SDPA without a padding mask, what these
forward passes use) is assumed: eager attention would add heads × seq_len² scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from dba_ray.config import Config, DataConfig, MethodSpec
from dba_ray.methods import config_for_run, needs_stage1, uses_global_gradient
from dba_ray.model import BUILTIN_MODEL
from dba_ray.sharding import reads_own_rows

GiB = 1024**3
# RSS of a Ray Train worker before it builds its model (Python, torch, transformers,
# Ray, the dba_ray modules, gloo's process group), measured on CPU: 0.55-0.6 GiB.
PROCESS_OVERHEAD = int(0.6 * GiB)
# GPU memory the CUDA context and kernels take before any tensor (typical of CUDA 12
# on H100s; not measured here): subtracted from each GPU size.
CUDA_CONTEXT = int(0.5 * GiB)
GPU_SIZES_GIB = (24, 48, 80, 141)
# RSS above the saved tensors in forward + backward on CPU: glibc keeps freed blocks
# under its mmap threshold (up to 32 MiB) in its heap. Measured on Llamas of 4-16 layers:
# 1.15 in fp32, 1.33 in bf16.
HEAP_SLACK = {4: 1.15, 2: 1.33}
KEPT_HEAP = "freed activations the heap keeps"


def _kept_heap(act: int, gpu: bool) -> dict[str, int]:
    """On CPU, what a process still holds after its first backward: glibc keeps the
    freed activations' blocks in its heap (under its raised mmap threshold), so every
    later moment's RSS carries them (measured in the scale rehearsal: an FSDP rank's RSS
    stays one micro-batch's activations above its tensors after the gradients are freed).
    On GPU ``max_memory_allocated`` counts no freed block."""
    return {} if gpu else {KEPT_HEAP: act}


# Bytes per logit at the loss: training keeps three fp32 copies (12); evaluation, with
# no graph, the lm_head output and its fp32 copies as they live (measured: 13 in fp32,
# 8 in bf16, where the bf16 output is dropped once cast).
LOGIT_BYTES_TRAIN = 12
LOGIT_BYTES_EVAL = {4: 13, 2: 8}
MAX_WORKERS = 4096  # searched for the smallest worker count that fits


def dtype_bytes(name: str) -> int:
    return 4 if name == "float32" else 2


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: parameter shapes, FSDP units, layer sizes."""

    architecture: str
    shapes: dict[str, tuple[int, ...]]  # every parameter, tied ones once
    units: dict[str, list[str]]  # FSDP unit (a block's module name, or "" for the root) -> its parameters
    linears: list[tuple[str, int, int]]  # (module leaf name, in, out) of every nn.Linear, for LoRA
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def params(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def largest(self) -> int:
        return max(_numel(s) for s in self.shapes.values())

    def unit_size(self, unit: str) -> int:
        return sum(_numel(self.shapes[n]) for n in self.units[unit])

    @property
    def root(self) -> int:
        return self.unit_size("")

    @property
    def block(self) -> int:
        return max((self.unit_size(u) for u in self.units if u), default=0)

    def sharded(self, n: int) -> int:
        """Parameters rank 0 holds when ``n`` ranks shard every tensor's rows."""
        return sum(-(-(s[0] if s else 1) // n) * (_numel(s[1:]) if s else 1) for s in self.shapes.values())

    def lora_params(self, r: int, targets: list[str]) -> int:
        return sum(r * (i + o) for name, i, o in self.linears if name in targets)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def model_shape(model: torch.nn.Module) -> ModelShape:
    """The shape of a (meta-device) model: units as ``dba_ray.sharding.shard_model``
    makes them, one per module whose class the model lists in ``_no_split_modules``."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    prefixes = [name for name, m in model.named_modules() if name and type(m).__name__ in blocks]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    units: dict[str, list[str]] = {"": []}
    for name in shapes:
        unit = next((p for p in prefixes if name.startswith(p + ".")), "")
        units.setdefault(unit, []).append(name)
    c = model.config
    c = getattr(c, "get_text_config", lambda: c)()
    hidden, heads = c.hidden_size, c.num_attention_heads
    linears = [
        (name.rsplit(".", 1)[-1], m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    return ModelShape(
        architecture=type(model).__name__,
        shapes=shapes,
        units=units,
        linears=linears,
        hidden=hidden,
        intermediate=getattr(c, "intermediate_size", None) or 4 * hidden,
        layers=c.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or hidden // heads,
        vocab=c.vocab_size,
    )


# ---------------------------------------------------------------- activations


def layer_bytes(s: ModelShape, a: int) -> int:
    """Bytes per token one decoder layer saves for backward (see the module docstring)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return 2 * (4 + a) * s.hidden + a * (4 * q + 2 * kv + 4 * s.intermediate) + 4 * s.heads


def activation_bytes(s: ModelShape, tokens: int, a: int, checkpointing: bool, gpu: bool) -> int:
    """Peak activation memory of forward + backward over ``tokens`` tokens."""
    layer = layer_bytes(s, a) * (1.0 if gpu else HEAP_SLACK[a])
    saved = s.layers * (2 * a * s.hidden if checkpointing else layer)
    return int(tokens * (saved + (4 + a) * s.hidden + max(LOGIT_BYTES_TRAIN * s.vocab, layer)))


def eval_activation_bytes(s: ModelShape, tokens: int, a: int, gpu: bool) -> int:
    """Peak of a forward pass with no graph over ``tokens`` tokens (evaluation)."""
    layer = layer_bytes(s, a) * (1.0 if gpu else HEAP_SLACK[a])
    return int(tokens * max(LOGIT_BYTES_EVAL[a] * s.vocab, layer))


# ---------------------------------------------------------------- phases


@dataclass
class Moment:
    """What a worker holds at one point of a phase: on its device (all of it in RAM on
    CPU) and in host RAM (copies a GPU worker makes on the CPU)."""

    name: str
    device: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)


@dataclass
class Peak:
    device: int  # on CPU: the whole RSS (device and host parts, and the process)
    host: int  # GPU workers: RSS; CPU workers: equal to device
    moment: Moment


@dataclass
class Phase:
    """One job of the pipeline (or its tasks), planned for any worker count and layout."""

    name: str
    workers: int
    layout: str  # ddp, fsdp, or task (one process, not a Train job)
    gpu: bool
    cpus_per_worker: int
    at_once: int  # jobs (or tasks) of this phase that may run at the same time
    moments: Callable[[int, str], list[Moment]]

    def peak(self, n: int | None = None, layout: str | None = None, gpu: bool | None = None) -> Peak:
        gpu = self.gpu if gpu is None else gpu
        moments = self.moments(n or self.workers, layout or self.layout)
        if not gpu:
            top = max(moments, key=lambda m: sum(m.device.values()) + sum(m.host.values()))
            rss = sum(top.device.values()) + sum(top.host.values()) + PROCESS_OVERHEAD
            return Peak(rss, rss, top)
        top = max(moments, key=lambda m: sum(m.device.values()))
        host = max(sum(m.host.values()) for m in moments) + PROCESS_OVERHEAD
        return Peak(sum(top.device.values()) + CUDA_CONTEXT, host, top)

    def smallest_fit(self, gib: int, layout: str | None = None) -> int | None:
        """Fewest workers whose GPU peak fits ``gib`` GiB (None: none does). Only fsdp's
        peak falls with more workers (each holds 1/N), so only it is searched."""
        layout = layout or self.layout
        top = MAX_WORKERS if layout == "fsdp" else 1
        if self.peak(top, layout, gpu=True).device > gib * GiB:
            return None
        low, high = 1, top  # the peak falls as workers are added: bisect
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if self.peak(mid, layout, gpu=True).device <= gib * GiB else (mid + 1, high)
        return low


def _loading(s: ModelShape, b: int, gpu: bool, fsdp: bool, own_rows: bool, n: int) -> Moment:
    """Under fsdp a rank that can (``own_rows``: ``sharding.reads_own_rows``) reads only
    its rows, one tensor at a time; otherwise every Train worker first reads the whole
    model on the CPU (``load_model``) and moves it to its device, and only then does FSDP
    shard it."""
    if fsdp and own_rows:
        return Moment(
            "loading its rows", {"weights": b * s.sharded(n)}, {"one tensor's rows being read": b * s.largest // n}
        )
    whole = {"whole model, before sharding" if fsdp else "weights": b * s.params}
    return Moment("loading the model", whole, {"whole model read on the CPU": b * s.params} if gpu else {})


def _stage1(s: ModelShape, cfg: Config, data: DataConfig, second_moment: bool, shard_bytes: int, own_rows: bool):
    s1, b = cfg.stage1, dtype_bytes(cfg.model.dtype)
    tokens, gpu = s1.batch_size * data.seq_len, s1.use_gpu
    separate = second_moment or b != 4
    save_b = dtype_bytes(s1.save_dtype)

    def moments(n: int, layout: str) -> list[Moment]:
        fsdp = layout == "fsdp"
        p = s.sharded(n) if fsdp else s.params
        sums = {"fp32 gradient sums": 4 * p if separate else 0, "fp32 v_G sums": 4 * p * second_moment}
        stream = {"weights": b * p, "gradient": b * p, **sums}
        if fsdp:
            stream["gathered units"] = b * (s.root + 2 * s.block)
            stream["unit gradient (reduce-scatter)"] = b * max(s.root, s.block)
        stream["activations"] = activation_bytes(s, tokens, b, False, gpu)
        end = {"weights": b * p, "fp32 gradient sums": 4 * p, "fp32 v_G sums": 4 * p * second_moment}
        # No kept heap here: Stage 1 returns it to the OS before the reduction and before
        # each checkpoint (global_gradient._return_freed_heap).
        means = {"ĝ_G mean": 4 * p, "v_G mean": 4 * p * second_moment}
        if save_b != 4:
            means["stored copies"] = save_b * p * (1 + second_moment)
        if s1.svd_rank is not None:  # LAPACK's U, S, V^T and workspace for the largest matrix
            means["SVD of the largest matrix"] = 3 * 4 * s.largest
        # Measured: safetensors' save() holds the serialized file twice at its peak.
        means["artifact file being written (twice)"] = 2 * min(shard_bytes, save_b * p)
        loading = _loading(s, b, gpu, fsdp, own_rows, n)
        out = [loading, Moment("streaming", stream), Moment("writing the artifact", end, means)]
        if s1.checkpoint_every_tokens is not None:
            # dba_ray/stage1_checkpoint.py copies the sums a rank holds (under ddp rank 0
            # holds them whole) to the CPU, and safetensors serializes that copy again.
            copy = 4 * p * (1 + second_moment)
            held = {"weights": b * p, **sums, **({} if separate else {"gradient (the sums)": b * p})}
            out.append(Moment("writing a checkpoint", held, {"checkpoint copy": copy, "serialized copy": copy}))
        return out

    return moments


def stage1_phase(s: ModelShape, cfg: Config, shard_bytes: int, name: str = "stage 1", **change) -> Phase:
    """Stage 1 as configured; ``change``: stage1 keys a caller overrides (the merge's
    domain-Fisher pass runs it on train.data with the second moment)."""
    cfg = cfg.model_copy(update={"stage1": cfg.stage1.model_copy(update=change)})
    s1 = cfg.stage1
    return Phase(
        name,
        s1.num_workers,
        s1.parallel,
        s1.use_gpu,
        s1.cpus_per_worker,
        1,
        _stage1(s, cfg, s1.data, s1.second_moment, shard_bytes, s1.parallel == "fsdp" and reads_own_rows(cfg.model)),
    )


def _eval_tokens(cfg: Config, sets) -> int:
    """Tokens of one evaluation batch of the longest set."""
    lengths = [x.data.seq_len for x in sets if x.data is not None]
    return cfg.eval.batch_size * max(lengths, default=0)


def _dba_buffers(s: ModelShape, cfg: Config, method: str, p: int) -> dict[str, int]:
    """What DBA keeps per worker for ``p`` of the parameters (dba_ray/dba.py)."""
    d = cfg.train.dba
    if not uses_global_gradient(d):
        return {}
    g = dtype_bytes(d.grad_dtype)
    out = {"ĝ_G": g * p}
    if d.ggb and d.boost_mode == "update":
        out["ĝ_G/√v_G (boost_mode update)"] = g * p
    if d.anchor == "fisher":
        out["anchor: v_G/mean and θ0"] = (4 + dtype_bytes(cfg.model.dtype)) * p
    return out


def _stage2(s: ModelShape, cfg: Config, method: str, seq_len: int, eval_sets):
    t, b = cfg.train, dtype_bytes(cfg.model.dtype)
    a = 2 if t.use_gpu else b  # Stage 2 on GPU runs the forward under bf16 autocast
    lora = method == "lora"
    own_rows = not lora and t.parallel == "fsdp" and reads_own_rows(cfg.model)  # as trainer.build_model
    adapters = s.lora_params(t.lora.r, t.lora.target_modules) if lora else 0
    act = activation_bytes(s, t.batch_size * seq_len, a, t.gradient_checkpointing, t.use_gpu)
    eval_act = eval_activation_bytes(s, _eval_tokens(cfg, eval_sets), b, t.use_gpu) if eval_sets else 0  # no autocast

    def moments(n: int, layout: str) -> list[Moment]:
        fsdp = layout == "fsdp"
        p = s.sharded(n) if fsdp else s.params
        trained = adapters if lora else p
        state = {"weights": b * (p + adapters), "AdamW moments": 2 * b * trained, **_dba_buffers(s, cfg, method, p)}
        if fsdp:
            state["gathered units"] = b * (s.root + 2 * s.block)
        grads = {"gradients": b * trained}
        if fsdp:
            grads["unit gradient (reduce-scatter)"] = b * max(s.root, s.block)
        elif n > 1:
            grads["DDP buckets"] = b * trained
        step = {"AdamW step": b * trained if t.use_gpu else 2 * b * min(trained, s.largest)}
        kept = _kept_heap(act, t.use_gpu)
        # Each checkpoint (the last step's always) copies a rank's weights and AdamW
        # moments to the CPU before writing them (dba_ray/checkpoint.py), after the
        # gradients are freed.
        copies = {"checkpoint copies (weights, AdamW moments)": b * (p + adapters) + 2 * b * trained}
        out = [
            _loading(s, b, t.use_gpu, fsdp, own_rows, n),
            Moment("forward/backward", {**state, **grads, "activations": act}),
            Moment("optimizer step", {**state, **grads, **step, **kept}),
            Moment("checkpoint", {**state, **kept}, copies),
            Moment("export", {**state, **kept}, {"whole model on rank 0": b * s.params} if fsdp else {}),
        ]
        if eval_sets:
            # On CPU the evaluation's activations reuse the kept heap where they fit in it.
            out.append(Moment("evaluation", {**state, "activations": max(eval_act, kept.get(KEPT_HEAP, 0))}))
        return out

    return moments


def stage2_phase(s: ModelShape, cfg: Config, spec: MethodSpec, at_once: int = 1) -> Phase:
    """One Stage 2 run of ``spec`` (its train section resolved as the run trains)."""
    run = config_for_run(cfg, spec)
    t = run.train
    seq_len = t.data.seq_len if t.data is not None else 0
    moments = _stage2(s, run, spec.method, seq_len, run.eval.sets)
    return Phase(f"stage 2 {spec.name}", t.num_workers, t.parallel, t.use_gpu, t.cpus_per_worker, at_once, moments)


def _task(name: str, s: ModelShape, cfg: Config, on_cpu: dict[str, int], at_once: int) -> Phase:
    """Scoring tasks (one process each): the model made on the CPU (``on_cpu``), then
    moved to the task's device and scored with no graph."""
    t, b = cfg.train, dtype_bytes(cfg.model.dtype)
    sets = [*cfg.eval.sets, *cfg.eval.validation_sets]
    act = eval_activation_bytes(s, _eval_tokens(cfg, sets), b, t.use_gpu)
    made = Moment("making the model", {}, on_cpu)
    scoring = Moment("scoring", {"weights": b * s.params, "activations": act})
    return Phase(name, 1, "task", t.use_gpu, t.cpus_per_worker, at_once, lambda n, layout: [made, scoring])


def eval_phase(s: ModelShape, cfg: Config, models: int) -> Phase:
    """The scoring tasks: one per model (the base and each run's)."""
    return _task("evaluation", s, cfg, {"model": dtype_bytes(cfg.model.dtype) * s.params}, models)


def merge_phase(s: ModelShape, cfg: Config, builtin_base: bool) -> Phase:
    """A merge curve's tasks, one per knob (the chosen one's export holds less): the
    trained model merged in place toward θ0 tensor by tensor, with fp32 copies of θ0,
    θ_T and the result (and for fisher both Fishers) of one tensor at a time."""
    b = dtype_bytes(cfg.model.dtype)
    copies = 5 if cfg.merge.mode == "fisher" else 3
    on_cpu = {"trained model": b * s.params, "merging one tensor (fp32)": copies * 4 * s.largest}
    if builtin_base:
        on_cpu["base model (builtin: built whole)"] = b * s.params
    return _task("merge", s, cfg, on_cpu, len(cfg.merge.knob_values()))


def phases(
    cfg: Config,
    s: ModelShape,
    command: str,
    *,
    shard_bytes: int,
    pretrain: Config | None = None,
    spec: MethodSpec | None = None,
) -> list[Phase]:
    """The phases ``command`` runs for ``cfg`` (``plan`` plans what ``run`` runs), whether
    or not a cached base model or artifact would spare one. ``pretrain``: the pretraining
    run's config (``reuse.pretrain_plan``); ``spec``: the method of ``train``."""
    if command == "global-gradient":  # without stage1.data the command says so itself
        return [stage1_phase(s, cfg, shard_bytes)] if cfg.stage1.data is not None else []
    out = [stage2_phase(s, pretrain, MethodSpec(name="pretrain", method="pretrain"))] if pretrain else []
    specs = {"train": [spec], "tune": [cfg.tune.method]}.get(command, cfg.methods)
    if command != "train" and cfg.train.global_gradient is None and cfg.stage1.data is not None:
        if needs_stage1(cfg, specs):
            out.append(stage1_phase(s, cfg, shard_bytes))
    at_once = {"compare": cfg.compare.max_concurrent, "tune": cfg.tune.max_concurrent}.get(command, 1)
    out += [stage2_phase(s, cfg, spec, at_once) for spec in specs]
    if command in ("train", "tune"):
        return out
    if cfg.eval.sets:
        out.append(eval_phase(s, cfg, 1 + len(specs)))
    if cfg.merge is not None:
        if cfg.merge.mode == "fisher" and cfg.train.data is not None:
            fisher = {"data": cfg.train.data, "second_moment": True, "svd_rank": None}
            out.append(stage1_phase(s, cfg, shard_bytes, "merge: domain Fisher", **fisher))
        out.append(merge_phase(s, cfg, cfg.model.name_or_path == BUILTIN_MODEL and pretrain is None))
    return out


# ---------------------------------------------------------------- the report


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def size(n: float) -> str:
    """GiB above one, else MiB: the breakdowns' unit."""
    return gib(n) if n >= GiB else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _parts(m: Moment, gpu: bool) -> str:
    parts = {**m.device, **m.host, "process": PROCESS_OVERHEAD}
    if gpu:
        parts["CUDA context"] = CUDA_CONTEXT
    return ", ".join(f"{k} {size(v)}" for k, v in parts.items() if v)


def describe(s: ModelShape, cfg: Config) -> str:
    blocks = [u for u in s.units if u]
    return (
        f"model: {s.architecture}, {s.params / 1e6:,.1f}M parameters ({cfg.model.dtype}), {s.layers} layers, "
        f"hidden {s.hidden}, vocab {s.vocab}; FSDP units: root {s.root / 1e6:,.1f}M, "
        f"{len(blocks)} blocks of up to {s.block / 1e6:,.1f}M"
    )


def phase_line(p: Phase) -> str:
    """One phase, as configured: its peak per worker, when, and of what."""
    peak = p.peak()
    size_ = f"{gib(peak.device)} of GPU memory and {gib(peak.host)} of RAM" if p.gpu else f"{gib(peak.device)} of RAM"
    if p.layout == "task":
        who = f"{p.at_once} task(s), one process each"
    else:
        who = f"{p.workers} worker(s), {p.layout}" + (f", {p.at_once} runs at once" if p.at_once > 1 else "")
    where = "GPU" if p.gpu else "CPU"
    return f"{p.name} ({who}, {where}): {size_} per process at {peak.moment.name} ({_parts(peak.moment, p.gpu)})"


def gpu_table(plan: list[Phase]) -> list[str]:
    """The fewest workers (one GPU each) that fit each GPU size, and the host RAM a
    worker needs; a ddp phase that does not fit also shows fsdp's count."""
    head = f"{'phase':<28}" + "".join(f"{f'{g} GiB':>9}" for g in GPU_SIZES_GIB) + "  host RAM per worker"
    lines = [head]
    for p in plan:
        label = f"{p.name} ({p.layout})"
        counts = [p.smallest_fit(g) for g in GPU_SIZES_GIB]
        host = gib(p.peak(gpu=True).host)
        lines.append(f"{label:<28}" + "".join(f"{c or '—':>9}" for c in counts) + f"  {host}")
        if p.layout == "ddp" and None in counts:
            alt = [p.smallest_fit(g, "fsdp") for g in GPU_SIZES_GIB]
            lines.append(f"{'  as fsdp':<28}" + "".join(f"{c or '—':>9}" for c in alt))
    return lines


def report(cfg: Config, s: ModelShape, plan: list[Phase]) -> str:
    lines = [describe(s, cfg), "", "peak memory per process, by phase, and what it holds then:"]
    lines += [phase_line(p) for p in plan]
    lines += [
        "",
        f"smallest worker count that fits, one GPU each ({gib(CUDA_CONTEXT)} of it the CUDA context; "
        "—: no count fits); a node needs the host RAM per worker times the workers it holds:",
        *gpu_table(plan),
    ]
    return "\n".join(lines) + "\n"
