"""Typed, validated configuration: YAML files plus dotted command-line overrides.

Every option is documented once, here, in its field's description. ``dba-ray options``
and the error messages are derived from these models.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dba_ray.errors import UserError


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The one list of the methods a run trains with, and what each does.
METHOD_DOCS = {
    "dba": "train.dba and train.schedule as configured",
    "direct": "plain fine-tuning (GGB, DC, anchor off; constant lr)",
    "mixture": "direct on general + domain data (train.mixture)",
    "lora": "direct with peft adapters (train.lora)",
}
METHODS = tuple(METHOD_DOCS)
# `pretrain` is the pretrain section's own run, not one users list in `methods`.
MethodName = Literal[METHODS + ("pretrain",)]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


class Config(_Strict):
    """The root of a config file: one section per concern; the sections' classes follow."""

    output_dir: str = Field("runs/dba", description="Where a run writes its outputs.")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    stage1: Stage1Config = Field(default_factory=lambda: Stage1Config())
    pretrain: Optional[PretrainConfig] = Field(None, description="Make the base model first.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig())
    methods: list[MethodSpec] = Field(
        default_factory=lambda: [MethodSpec(name="dba", method="dba"), MethodSpec(name="direct", method="direct")],
        description=f"What `dba-ray run` and `compare` train: method names ({', '.join(METHODS)}) "
        "or {name, method, set} variants.",
    )
    tune: TuneConfig = Field(default_factory=lambda: TuneConfig())
    compare: CompareConfig = Field(default_factory=lambda: CompareConfig())
    merge: Optional[MergeConfig] = Field(
        None, description="Merge curves toward the base after training (`run`, `compare`, `merge`)."
    )
    ray: RayConfig = Field(default_factory=lambda: RayConfig())
    tracking: Optional[TrackingConfig] = Field(
        None, description="Log runs to MLflow and/or W&B (see the tracking.* keys)."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> "Config":
        names = [m.name for m in self.methods]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"method names must be unique: {sorted(dup)} repeated")
        return self

    def stage1_output(self) -> str:
        return self.stage1.output or f"{self.output_dir.rstrip('/')}/global_gradient"

    def global_gradient_source(self) -> str:
        return self.train.global_gradient or self.stage1_output()


class RayConfig(_Strict):
    address: Optional[str] = Field(
        None,
        description="Ray cluster to join. None: the cluster this driver was submitted "
        "to (RAY_ADDRESS, or a running local one), else start an embedded local cluster.",
    )
    num_cpus: Optional[int] = Field(
        None,
        ge=1,
        description="Logical CPUs of an embedded local cluster. Keep it above the CPUs "
        "given to Train workers so Ray Data has some left to stream with.",
    )
    tokenize_concurrency: Optional[int] = Field(
        None,
        ge=1,
        description="Most Ray Data tasks tokenizing at once (None: as many as there are "
        "free CPUs). Each worker process loads the tokenizer once and keeps it. Here, not "
        "under data, because it changes how data is made, not which: caches stay valid.",
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources each Train worker (pretraining, Stage 1, Stage 2) "
        "reserves besides its CPUs and GPU, e.g. {spot_gpu: 1}: workers then run only on "
        "nodes that offer them (`ray start --resources`), as many per node as it has units.",
    )


class ModelConfig(_Strict):
    name_or_path: str = Field(
        "builtin:tiny-llama",
        description="Hugging Face model name, local directory, or 'builtin:tiny-llama' "
        "(a 2-layer Llama built in code, random weights, no download).",
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: Optional[str] = Field(
        None,
        description="Tokenizer name or path; defaults to the model's. 'builtin:bytes' is "
        "the download-free byte-level tokenizer the builtin model uses.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Dtype of the weights (Stage 2 on GPU also runs the forward pass under bf16 autocast).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off unless you trust the repo.")
    seed: int = Field(0, description="Initialisation seed of a builtin model.")
    builtin_config: dict[str, Any] = Field(
        default_factory=dict,
        description="LlamaConfig fields overriding the builtin model's (e.g. "
        "hidden_size, num_hidden_layers), to size it for a benchmark.",
    )


class DataConfig(_Strict):
    path: Optional[str] = Field(
        None,
        description="File or folder (local, s3://, gs://) of JSON Lines, JSON, Parquet or "
        "plain-text files, or 'builtin:python-docs' (standard-library docstrings, made "
        "offline). Exactly one of path / hf_dataset.",
    )
    hf_dataset: Optional[str] = Field(
        None,
        description="Hugging Face data set: hub name, or a local directory (a "
        "save_to_disk copy or data files). Exactly one of path / hf_dataset.",
    )
    hf_config: Optional[str] = Field(None, description="Data set configuration name.")
    split: str = Field("train", description="Split of an hf_dataset.")
    streaming: bool = Field(False, description="Stream an hf_dataset instead of downloading it whole.")
    file_format: Literal["auto", "jsonl", "json", "parquet", "text"] = Field(
        "auto", description="File format under `path`; auto: from each file's extension."
    )
    format: Literal["text", "instruction", "chat"] = Field(
        "text",
        description="Record format. text: raw text packed into seq_len sequences with EOS "
        "between documents. instruction: alpaca fields instruction/input/output. chat: a "
        "messages list rendered with the tokenizer's chat template. Prompt tokens of "
        "instruction and chat records are masked out of the loss.",
    )
    text_field: str = Field("text", description="Field holding the text of `text` records.")
    messages_field: str = Field("messages", description="Field holding `chat` messages.")
    sample_by: Literal["line", "paragraph", "document"] = Field(
        "line", description="How plain-text files split into records."
    )
    seq_len: int = Field(512, ge=8, description="Tokens per training sequence.")
    shuffle_seed: Optional[int] = Field(
        None,
        description="Shuffle records with this seed (a full Ray Data shuffle, deterministic). None keeps source order.",
    )
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail",
        description="A malformed record fails the run naming its file and line, or is skipped and counted.",
    )
    subset: Literal["all", "train", "validation"] = Field(
        "all",
        description="Which records of the source to use. validation: the records whose "
        "int(sha256(key)[8:16], 16) % 10 == 0 (about a tenth; key = the text of a text "
        "record, else its normalized fields as JSON); train: all the others. The same "
        "file then gives a training set and a validation set that share no record.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.path is None) == (self.hf_dataset is None):
            raise ValueError("give exactly one of 'path' or 'hf_dataset'")
        return self


class Stage1Config(_Strict):
    data: Optional[DataConfig] = Field(None, description="The general data (required).")
    max_tokens: Optional[int] = Field(
        None,
        ge=1,
        description="Token budget, rounded up to whole sequences of seq_len (padding of "
        "instruction/chat sequences counts). None: all data.",
    )
    max_records: Optional[int] = Field(None, ge=1, description="Record budget, applied before tokenization.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch per worker.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How Stage 1's workers hold the model: ddp, a whole copy each (one "
        "all-reduce at the end; rank 0 writes the artifact); fsdp, FSDP2 shards of the "
        "weights and of the ĝ_G / v_G sums (1/N each; each rank writes its own rows). "
        "ĝ_G and v_G are the same either way (see second_moment), up to rounding: "
        "under fsdp a bf16 model's micro-batch gradients are summed across workers in bf16.",
    )
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per worker; also its torch thread count.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    output: Optional[str] = Field(
        None,
        description="Artifact directory (local path or s3:// / gs:// URI). Default: <output_dir>/global_gradient.",
    )
    overwrite: bool = Field(False, description="Replace an existing artifact at `output`.")
    max_failures: int = Field(
        0,
        ge=0,
        description="Worker failures (a process or a whole node lost) survived by running "
        "the job again: from its last checkpoint with checkpoint_every_tokens, else from "
        "the start of the data. The artifact itself is written only at the end.",
    )
    checkpoint_every_tokens: Optional[int] = Field(
        None,
        ge=1,
        description="Checkpoint the running sums (this rank's rows under fsdp), the counts "
        "and the data position (the keys of the sequences counted so far) every this many "
        "trained tokens, in Ray Train's run folder under <output_dir>/ray_train (the last "
        "one kept). A job that lost workers (max_failures), or the same command run again "
        "after a lost driver, continues from there: it reads the data again from the "
        "start, skipping without a forward pass the sequences already counted, and its "
        "artifact equals one uninterrupted pass. Workers then step together, one "
        "micro-batch each (one small all-reduce per micro-batch). Needs stage1.data. "
        "None: no checkpoints.",
    )
    second_moment: bool = Field(
        False,
        description="Also keep v_G, the mean over global micro-batches of the square of "
        "each one's mean gradient (a global micro-batch: the k-th micro-batch of every "
        "worker, batch_size × num_workers sequences), a diagonal empirical Fisher for the "
        "fisher anchor and merge. ddp and fsdp compute the same v_G; it depends on the "
        "global micro-batch size. One more fp32 buffer per parameter (1/N of one under "
        "fsdp); with more than one worker the micro-batch gradients are summed across "
        "workers every micro-batch, as training does.",
    )
    svd_rank: Optional[int] = Field(
        None,
        ge=1,
        description="Store each 2-D tensor as a rank-r SVD (paper: 512); 1-D stay dense.",
    )
    save_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the stored tensors (accumulation is always fp32)."
    )
    to_object_store: bool = Field(
        False,
        description="Also keep the result in the Ray object store and return its "
        "ObjectRef (for a pipeline that runs Stage 2 in the same driver).",
    )
    description: str = Field("", description="Free text stored in meta.json.")
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between progress lines on the driver.")

    @model_validator(mode="after")
    def _fits_parallel(self) -> "Stage1Config":
        # Under fsdp no process ever holds a whole tensor; these two would need one.
        if self.parallel == "fsdp" and self.svd_rank is not None:
            raise ValueError(
                "svd_rank needs each matrix whole, which no worker holds under parallel: fsdp; "
                "use parallel: ddp to compress, or drop svd_rank"
            )
        if self.parallel == "fsdp" and self.to_object_store:
            raise ValueError(
                "to_object_store puts the whole ĝ_G in one object, which no worker holds under "
                "parallel: fsdp; keep it on disk or cloud storage (stage1.output), which Stage 2 "
                "reads rank by rank"
            )
        return self


class DBAConfig(_Strict):
    """The DBA update (see dba_ray/dba.py). All off is plain fine-tuning."""

    ggb: bool = Field(
        True,
        description="Global gradient boosting: the optimizer sees "
        "g_B = γ_t·ĝ_G + (1−γ_t)·g_D with γ_t = min(gamma_max, boost/T·(1 − t/T)).",
    )
    boost: float = Field(200.0, ge=0, description="k0·T, the boost knob that does not depend on T (paper: 200).")
    gamma_max: float = Field(1.0, ge=0, le=1, description="Upper clip of γ_t (paper: 1).")
    boost_mode: Literal["gradient", "update", "masked"] = Field(
        "gradient",
        description="Where ĝ_G enters. gradient (the paper): in g_B, which AdamW then "
        "normalizes per weight by the domain gradient's second moment, so a weight the "
        "domain data never moves takes a full lr-sized step along ĝ_G every step. update: "
        "AdamW steps on g_D alone and then each weight moves by −γ_t·c_t·lr_t·ĝ_G/√v_G "
        "(v_G from Stage 1; clipped to ±1 per weight), at most γ_t·c_t·lr_t and less where "
        "the general gradient is noise; c_t is DC's, as for gradient. masked: in g_B, but ĝ_G clipped "
        "per weight to ±|g_D| of the step, so it can tilt a weight the domain data moves "
        "and never moves one on its own. Under gradient, a run warns before its first step when "
        "5% or more of the input-embedding rows ĝ_G moves belong to tokens its domain data "
        "never uses (README, The vocabulary warning).",
    )
    dc: Literal["norm", "cosine", "pcgrad", "none"] = Field(
        "norm",
        description="Dynamic correction of the step's learning rate (never the gradient). "
        "norm: c_t = (γ‖ĝ_G‖ + (1−γ)‖g_D‖)/‖g_B‖; cosine: c_t = 1 + kappa·(1 − cos)/2, "
        "and c_t = 1 when cos is undefined (g_D or ĝ_G zero, e.g. a batch whose tokens are "
        "all masked); both clipped to [1, c_max]. pcgrad: drop g_D's component against "
        "ĝ_G, c_t = 1. none: c_t = 1.",
    )
    kappa: float = Field(
        1.0,
        ge=0,
        description="Strength of the cosine correction: c_t runs from 1 (cos = 1) to "
        "1 + kappa (cos = −1) before the c_max clip, so kappa above 2·(c_max − 1) saturates.",
    )
    c_max: float = Field(2.0, ge=1, description="Largest learning-rate multiplier DC may apply (norm and cosine).")
    anchor: Literal["none", "fisher"] = Field(
        "none",
        description="fisher: add fisher_lambda·(v_G/mean(v_G))⊙(θ − θ0) to g_D, an EWC-style "
        "pull to the base weights (needs the artifact's second moment).",
    )
    fisher_lambda: float = Field(
        0.1,
        ge=0,
        description="Strength of the fisher anchor: the pull toward θ0 relative to the domain gradient.",
    )
    grad_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype ĝ_G is held in during training (bfloat16 halves it)."
    )


class ScheduleConfig(_Strict):
    """The learning rate; `anneal: true` is DBA's AL."""

    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    anneal: bool = Field(
        True,
        description="AL: warm up to lr, then decay to min_lr_ratio·lr. Off: constant lr.",
    )
    shape: Literal["cosine", "linear", "wsd"] = Field(
        "cosine",
        description="Decay shape. wsd: stay at lr, then decay linearly over the last "
        "decay_ratio of the steps (every step of that window lower than the one before, "
        "the last at min_lr_ratio·lr).",
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps warming up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of lr.")
    decay_ratio: float = Field(0.2, gt=0, le=1, description="wsd: fraction of steps decaying.")


class OptimizerConfig(_Strict):
    """AdamW, the optimizer every method steps with."""

    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam β1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="Adam β2.")
    eps: float = Field(1e-8, gt=0, description="Adam ε.")
    grad_clip: Optional[float] = Field(
        1.0, gt=0, description="Clip g_D to this global norm before DBA; None: no clipping."
    )


class LoraConfig(_Strict):
    """The `lora` baseline (peft): adapters on the base weights, merged at the end."""

    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale alpha/r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters (Llama-style names by default).",
    )


class MixtureConfig(_Strict):
    """The `mixture` baseline: vanilla fine-tuning on general + domain data."""

    ratio: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction r of training sequences that are general: every domain "
        "sequence is kept and round(n_domain·r/(1−r)) general ones are shuffled in, so "
        "the domain data is seen as often as by the other methods (equal domain steps: "
        "max_steps, when set, counts domain steps and becomes ceil(max_steps/(1−r))).",
    )
    data: Optional[DataConfig] = Field(
        None, description="General data to mix in. Default: stage1.data (tokenized at train.data.seq_len)."
    )


class TrainConfig(_Strict):
    data: Optional[DataConfig] = Field(None, description="The domain data (required).")
    max_records: Optional[int] = Field(None, ge=1, description="Record budget of the domain data, before tokenization.")
    global_gradient: Optional[str] = Field(
        None,
        description="ĝ_G artifact (path or URI). Default: <output_dir>/global_gradient.",
    )
    dba: DBAConfig = Field(default_factory=DBAConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch per worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the domain data (T follows).")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps T; overrides epochs when set.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP or FSDP ranks).")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model, its gradients, AdamW state "
        "and ĝ_G (fastest while they fit). fsdp: FSDP2, each worker holds 1/num_workers "
        "of each (one transformer block is gathered at a time), for models too big for "
        "one device; the DBA statistics are all-reduced. Checkpoints of either resume "
        "under either, on any num_workers; the run's identity is its global batch "
        "(batch_size × num_workers × grad_accum), not its layout.",
    )
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per worker; its torch threads.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL, bf16 autocast).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: at the end only).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: at the end only).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per run.")
    max_failures: int = Field(0, ge=0, description="Worker failures survived by resuming from the last checkpoint.")
    seed: int = Field(0, description="Data order seed (per epoch: seed + epoch); also seeds LoRA's init.")
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between progress lines.")


class EvalSetConfig(_Strict):
    name: str = Field(description="Name in reports.")
    kind: Literal["domain", "general"] = Field(description="Which score it counts toward.")
    type: Literal["text", "choice", "lm_eval"] = Field(
        "text",
        description="text: held-out text, tokenized like training data (NLL, perplexity, "
        "next-token accuracy). choice: multiple-choice records {question, choices, "
        "answer (index)}, scored by the log-likelihood of each choice (accuracy). lm_eval: "
        "lm-evaluation-harness tasks run on the saved model with the harness's Hugging Face "
        "backend (needs `pip install 'dba-ray[lmeval]'`); the set's score is the mean over "
        "`tasks` of each task's counted metric. Scored on saved models only: at the end of "
        "a run and by eval / run / compare, not at train.eval_every evaluations.",
    )
    data: Optional[DataConfig] = Field(
        None, description="The set's records (a `path`, for choice sets). Not for lm_eval sets."
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="lm_eval sets: harness task or group names (e.g. mmlu, gsm8k, arc_challenge, "
        "hellaswag; hub data sets need the network) or paths to task YAML files (offline with "
        "local data files).",
    )
    num_fewshot: Optional[int] = Field(
        None, ge=0, description="lm_eval sets: few-shot examples per prompt (None: each task's default)."
    )
    limit: Optional[float] = Field(
        None,
        gt=0,
        description="lm_eval sets: documents per task, a count (>= 1) or a fraction (< 1) of "
        "each task's test split (None: all).",
    )
    metrics: dict[str, str] = Field(
        default_factory=dict,
        description="lm_eval sets: the metric each task counts with (task name: metric, or "
        "metric,filter such as exact_match,flexible-extract). A task not named here counts "
        "with its primary metric: acc_norm when the task reports it, else the first metric "
        "of its metric_list, under its first filter.",
    )
    per_record: bool = Field(
        False,
        description="text sets: score each record alone (tokenized with EOS after it, cut into "
        "seq_len pieces, never packed with another record) and report every record's [NLL sum, "
        "correct, tokens] under the set's `records`, in file order (what a bootstrap over records "
        "resamples). The set's NLL and accuracy are then totals over its records.",
    )

    @model_validator(mode="after")
    def _fits_type(self) -> "EvalSetConfig":
        if self.type == "lm_eval":
            if not self.tasks:
                raise ValueError(f"eval set {self.name!r}: type lm_eval needs tasks")
            if self.data is not None:
                raise ValueError(f"eval set {self.name!r}: an lm_eval set reads its tasks' data, not `data`")
        else:
            if self.data is None:
                raise ValueError(f"eval set {self.name!r}: type {self.type} needs data")
            # By value, not by presence: a dumped config carries every key.
            harness_keys = [
                k for k in ("tasks", "num_fewshot", "limit", "metrics") if getattr(self, k) not in (None, [], {})
            ]
            if harness_keys:
                raise ValueError(f"eval set {self.name!r}: {', '.join(harness_keys)} apply to lm_eval sets only")
        if self.per_record and self.type != "text":
            raise ValueError(f"eval set {self.name!r}: per_record applies to text sets only")
        return self


class EvalConfig(_Strict):
    sets: list[EvalSetConfig] = Field(
        default_factory=list, description="Evaluation sets: what reports show (the test sets)."
    )
    validation_sets: list[EvalSetConfig] = Field(
        default_factory=list,
        description="Sets every choice is made on (a merge knob; the benchmark's learning "
        "rates), so that eval.sets stay out of selection. Every trained and merged model "
        "is scored on them too (`validation` in report.json).",
    )
    max_sequences: int = Field(
        256,
        ge=1,
        description="Sequences (choice and per_record sets: records) taken from each set, the first ones.",
    )
    batch_size: int = Field(16, ge=1, description="Sequences per evaluation batch.")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="`dba-ray eval`: models to score beside the base (name: path).",
    )


class PretrainConfig(_Strict):
    """Optional: train the base model first (the offline quickstart does, so that its
    tiny model has some general ability to lose). Cached: a second run reuses it."""

    data: DataConfig = Field(description="General text to pretrain on.")
    max_steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per step per worker.")
    schedule: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(lr=3e-3, warmup_ratio=0.05, min_lr_ratio=0.1),
        description="Learning rate schedule of pretraining.",
    )
    eval_every: int = Field(0, ge=0, description="Score the general eval sets every N steps (curves.jsonl).")
    checkpoint_every: int = Field(
        0,
        ge=0,
        description=(
            "Checkpoint every N steps (0: at the end only). A pretraining stopped part-way (the command killed, "
            "a node lost) resumes from its last checkpoint when the same command runs again. Not part of the "
            "cache key: it does not change the weights."
        ),
    )


class MergeConfig(_Strict):
    """After training, models between the base θ0 and a trained θ_T (dba_ray/merge.py):
    a curve of operating points from one run, for the price of evaluation only."""

    mode: Literal["linear", "fisher"] = Field(
        "linear",
        description="linear: θ0 + α·(θ_T − θ0), knob α in [0, 1] (1: the trained model). "
        "fisher: per weight the average of θ0 and θ_T weighted by λ·F_G and F_D (F_G: v_G "
        "from Stage 1, needs stage1.second_moment; F_D: the domain data's, computed at θ_T "
        "by the Stage 1 code path and cached beside the run), knob λ >= 0 (0: the trained "
        "model; larger: closer to the base).",
    )
    knobs: Optional[list[float]] = Field(
        None,
        description="Values of α (linear) or λ (fisher) to score. None: "
        "[0, 0.25, 0.5, 0.75, 1] for linear, [0, 0.1, 0.3, 1, 3, 10] for fisher.",
    )
    methods: list[str] = Field(
        default_factory=list,
        description="`run` / `compare`: names in `methods` whose runs get a merge curve "
        "(every lr and seed of them). Empty: every method.",
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="`dba-ray merge`: trained models to merge (name: path or URI). Empty: "
        "<output_dir>/<name>/model of each entry of `methods` that exists.",
    )
    fisher_max_tokens: Optional[int] = Field(
        None,
        ge=1,
        description="fisher: token budget of the domain-Fisher pass over train.data (None: all of it).",
    )
    export: bool = Field(
        True,
        description="Save the model at the knob chosen on eval.validation_sets to "
        "<run folder>/merged/model (save_pretrained).",
    )

    @model_validator(mode="after")
    def _check_knobs(self) -> "MergeConfig":
        if self.knobs is not None:
            if not self.knobs:
                raise ValueError("knobs must not be empty (or leave it out for the default)")
            if self.mode == "linear" and not all(0 <= k <= 1 for k in self.knobs):
                raise ValueError(f"linear merge knobs α must lie in [0, 1] (got {self.knobs})")
            if self.mode == "fisher" and not all(k >= 0 for k in self.knobs):
                raise ValueError(f"fisher merge knobs λ must be >= 0 (got {self.knobs})")
        return self

    def knob_values(self) -> list[float]:
        if self.knobs is not None:
            return sorted(set(self.knobs))
        return [0.0, 0.25, 0.5, 0.75, 1.0] if self.mode == "linear" else [0.0, 0.1, 0.3, 1.0, 3.0, 10.0]


class MethodSpec(_Strict):
    """One training run of a comparison: a method plus overrides of `train` keys. A bare
    string in `methods` is a spec named after its method."""

    name: str = Field(description="Name in reports and the run's folder name.")
    method: MethodName = Field(
        description=" ".join(f"{m}: {doc}." for m, doc in METHOD_DOCS.items())
        + " pretrain: the base model's pretraining (used by the pretrain section).",
    )
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted keys under `train` applied after the method's own settings, "
        "e.g. {dba.dc: pcgrad} or {schedule.anneal: true} (an ablation or a variant).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value, "method": value}
        if isinstance(value, dict) and "name" in value and "method" not in value:
            return {**value, "method": value["name"]}
        return value

    @model_validator(mode="after")
    def _check(self) -> "MethodSpec":
        if not _NAME.match(self.name):
            raise ValueError(f"run name {self.name!r} may use letters, digits and _ . = + - only")
        return self


class TuneConfig(_Strict):
    """`dba-ray tune`: a Ray Tune sweep of one method's Stage 2 knobs (never a data ratio
    for dba: DBA trains on domain data only)."""

    method: MethodSpec = Field(
        default_factory=lambda: MethodSpec(name="dba", method="dba"),
        description="The method (or named variant) whose knobs are swept.",
    )
    search: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys under `train` → values: a list (grid), or {choice: [...]}, "
        "{uniform: [lo, hi]}, {loguniform: [lo, hi]}. Allowed: schedule.lr, schedule.anneal, "
        "schedule.shape, schedule.warmup_ratio, schedule.min_lr_ratio, schedule.decay_ratio, "
        "dba.ggb, dba.boost, dba.gamma_max, dba.dc, dba.kappa, dba.c_max, dba.fisher_lambda, "
        "and mixture.ratio for the mixture method only. merge.knob (a list), alone: a sweep "
        "of the merge knob (merge.mode) on the finished run of `method`, each trial one "
        "evaluation, no training.",
    )
    num_samples: int = Field(1, ge=1, description="Samples of the random parts of the space (grids multiply).")
    max_concurrent: int = Field(2, ge=1, description="Trials running at once.")
    asha: bool = Field(True, description="Stop weak trials early (ASHA on S; needs train.eval_every > 0).")
    grace_evals: int = Field(1, ge=1, description="ASHA: evaluations before a trial may be stopped.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: halving rate.")
    seed: int = Field(0, description="Seed of the search (random samples).")
    validation_sets: list["EvalSetConfig"] = Field(
        default_factory=list,
        description="Sets S is measured on to pick the best trial (keep your test sets out of "
        "model selection). Empty: eval.validation_sets, else eval.sets with a warning.",
    )


class CompareConfig(_Strict):
    """`dba-ray compare`: every listed method on one base model and one ĝ_G."""

    lrs: list[float] = Field(
        default_factory=list,
        description="Peak learning rates each method runs at (a frontier of S_G against S_D "
        "per method). Empty: train.schedule.lr only.",
    )
    seeds: list[int] = Field(default_factory=lambda: [0], description="train.seed values each run is repeated with.")
    mixture_ratios: list[float] = Field(
        default_factory=list,
        description="The mixture ratio search: one extra `mixture` run per ratio (and lr, "
        "seed); its total cost is charged to every mixture run.",
    )
    max_concurrent: int = Field(2, ge=1, description="Runs at once (as Ray Tune trials).")


class MlflowTrackingConfig(_Strict):
    """MLflow: one tracked run per Stage 1 job, Stage 2 run and command."""

    tracking_uri: Optional[str] = Field(
        None,
        description="Where runs go: a tracking server (http://127.0.0.1:5000), a local store "
        "(file:///abs/path/mlruns, sqlite:///mlflow.db) or databricks. None: "
        "MLFLOW_TRACKING_URI, else MLflow's default.",
    )
    experiment: str = Field("dba-ray", description="MLflow experiment (created if missing).")


class WandbTrackingConfig(_Strict):
    """Weights & Biases: one W&B run per Stage 1 job, Stage 2 run and command."""

    project: str = Field("dba-ray", description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B team or user (None: your default).")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online",
        description="online needs WANDB_API_KEY or `wandb login`; offline keeps the runs on disk "
        "(upload them later with `wandb sync`).",
    )
    dir: Optional[str] = Field(
        None,
        description="Local directory for W&B's run files (a wandb/ folder inside it). None: "
        "output_dir when it is local, else W&B's default.",
    )


class TrackingConfig(_Strict):
    """Experiment tracking. Each Stage 1 job, Stage 2 run (a `tune` trial and a `compare`
    run included) and each run / compare / tune command is one tracked run; a command's
    runs share a group (W&B group; MLflow: nested under the command's run, tag
    dba_ray.group). Nothing is logged when `tracking` is absent."""

    mlflow: Optional[MlflowTrackingConfig] = Field(None, description="Track in MLflow.")
    wandb: Optional[WandbTrackingConfig] = Field(None, description="Track in Weights & Biases.")
    group: Optional[str] = Field(
        None,
        description="Name of the group a command's runs share. None: <command>-<last part of output_dir>-<UTC time>.",
    )


# Config names the section classes before they are defined (it comes first, to show
# the shape of a file): resolve those names now that they exist.
Config.model_rebuild()


def digest(obj: Any) -> str:
    """A short, stable hash of settings (JSON-able), for cache keys and run names."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _YamlLoader(yaml.SafeLoader):
    """YAML as users write it: PyYAML (YAML 1.1) reads ``2e6`` and ``1.0e7`` as strings;
    YAML 1.2 and every user mean numbers."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value``; the value is YAML (``2e6`` is read as a number)."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override {item!r} has an empty key")
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    return parts, value


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def flatten(tree: dict, keep=lambda value: False, prefix: str = "") -> dict:
    """``{a: {b: 1}}`` → ``{"a.b": 1}``; dicts for which ``keep`` is true stay values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and not keep(value):
            out.update(flatten(value, keep, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model class of a field's type: ``X``, ``Optional[X]`` or ``list[X]``."""
    candidates = (annotation, *getattr(annotation, "__args__", ()))
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config model class that owns the key at ``loc`` (for listing allowed keys)."""
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        model = _model_in(field.annotation)
        if model is None:
            return None
    return model


def format_validation_error(err: ValidationError, origin: str) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "<top>"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            allowed = ", ".join(owner.model_fields) if owner else "?"
            msgs.append(f"unknown key '{key}' (allowed here: {allowed})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            msgs.append(f"'{key}': {msg} (got {e.get('input')!r})")
    return f"invalid config {origin}: " + "; ".join(msgs)


def describe_options(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """One line per option: dotted key, type, default, description (for ``dba-ray
    options``), read from the models above so the docs cannot drift from the code."""
    model = model or Config
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        nested = _model_in(ann)
        if nested is not None:
            if field.description:
                lines.append(f"{key}: {field.description}")
            lines.extend(describe_options(nested, f"{key}."))
            continue
        default = field.get_default(call_default_factory=True)
        type_name = str(ann).replace("typing.", "") if not isinstance(ann, type) else ann.__name__
        lines.append(f"{key} ({type_name}, default {default!r}): {field.description}")
    return lines


_REQUIRED = object()


def options_yaml() -> str:
    """Every option as one commented YAML file (``dba-ray options --yaml``): each key with
    its description above it and its default as the value. Sections that are off by
    default (``pretrain``, ``merge``, ``tracking``, data sources) and the fields of list
    entries are there as comments, so the file loads as the defaults."""
    lines = [
        "# dba-ray: every config key with its default (dba-ray options --yaml).",
        "# Sections off by default, and the keys of list entries, are commented out.",
        "",
    ]
    _yaml_lines(Config, Config().model_dump(mode="json"), 0, False, lines)
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n...\n").strip()


def _yaml_lines(model: type[BaseModel], values: dict | None, depth: int, commented: bool, out: list[str]) -> None:
    """``model``'s keys at ``depth``. ``values``: the defaults in force here; None inside
    a section that is off, where the class's own defaults are shown."""
    pad = "  " * depth
    for name, field in model.model_fields.items():
        nested = _model_in(field.annotation)
        is_list = getattr(field.annotation, "__origin__", None) is list
        if values is not None:
            value = values[name]
        elif field.is_required():
            value = _REQUIRED
        else:
            value = field.get_default(call_default_factory=True)
            value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        doc = field.description or (nested.__doc__ if nested is not None and not is_list else None) or ""
        if out[-1] != "" and depth == 0:
            out.append("")
        for line in textwrap.wrap(" ".join(doc.split()), max(40, 88 - len(pad))):
            out.append(f"{pad}# {line}")
        if nested is not None and not is_list:
            off = commented or value is None or value is _REQUIRED
            out.append(f"{pad}{'# ' if off else ''}{name}:")
            _yaml_lines(nested, value if isinstance(value, dict) else None, depth + 1, off, out)
            continue
        mark = "# " if commented or value is _REQUIRED else ""
        out.append(f"{pad}{mark}{name}: {'(required)' if value is _REQUIRED else _yaml_value(value)}")
        if nested is not None:  # a list of sections: the keys of one entry
            out.append(f"{pad}  # each entry:")
            _yaml_lines(nested, None, depth + 1, True, out)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key.path=value`` overrides, validate."""
    tree: dict = {}
    origin = "(defaults)"
    if path is not None:
        origin = str(path)
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = _yaml(p.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"config {path} is not valid YAML: {e}".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config {path} must be a mapping at the top level")
        tree = loaded or {}
    for item in overrides or []:
        parts, value = parse_override(item)
        _set_dotted(tree, parts, value)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e, origin)) from None
    # Ray Train runs workers in other directories: a local model path must be absolute.
    for key in ("name_or_path", "tokenizer"):
        value = getattr(cfg.model, key)
        if value and "://" not in value and not value.startswith("builtin:") and Path(value).exists():
            setattr(cfg.model, key, str(Path(value).absolute()))
    return cfg
