"""The global-gradient artifact: ĝ_G (and optionally v_G) as safetensors + meta.json.

Layout of an artifact directory (local path or s3:// / gs:// URI)::

    mean_gradient-00001-of-0000N.safetensors   ĝ_G, tensor names = named_parameters()
    second_moment-00001-of-0000N.safetensors   v_G (optional), same names
    meta.json                                  written last: its presence = complete

Written by a sharded Stage 1 (``stage1.parallel: fsdp``), each rank writes its own dim-0
rows of every tensor, ``mean_gradient-rank-RRRRR-of-WWWWW-00001-of-0000N.safetensors``
(and ``second_moment-rank-…``); meta.json gives each such file its ``rank`` and
``ranks``, and a reader pieces rows together across them (``dba_ray.row_blocks``), so
a Stage 2 rank reads only its own rows, with any worker count or layout.

With SVD compression a 2-D tensor ``W`` is stored as ``W.svd_us`` (m×r, U·diag(S)) and
``W.svd_vh`` (r×n); loading multiplies them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from dba_ray import __version__, storage
from dba_ray.errors import UserError
from dba_ray.row_blocks import RowBlocks

log = logging.getLogger("dba_ray")

# 2: row blocks written by a sharded Stage 1 (version 1 readers would take one rank's
# rows for the whole tensor); an artifact of whole tensors is still written as 1.
FORMAT_VERSION = 2
WHOLE_TENSORS_VERSION = 1
KIND = "dba-ray/global-gradient"
META = "meta.json"
MAX_SHARD_BYTES = 2 * 1024**3
# name -> (start, stop): the dim-0 rows of a tensor one rank reads
Rows = dict[str, tuple[int, int]]


@dataclass
class GlobalGradient:
    """ĝ_G (``mean``), optional v_G (``second_moment``), and their metadata."""

    mean: dict[str, torch.Tensor]
    meta: dict[str, Any]
    second_moment: dict[str, torch.Tensor] | None = None

    def check_model(self, model: torch.nn.Module, model_name: str = "the model") -> None:
        """Refuse a model whose parameters differ from the one ĝ_G was computed on."""
        check_fingerprint(ArtifactMeta(self.meta), model, model_name)


@dataclass(frozen=True)
class ArtifactMeta:
    """meta.json of an artifact, read by name. ``raw`` is the dict as written (meta.json
    itself keeps its keys); the properties are what other modules read of it."""

    raw: dict[str, Any]

    @classmethod
    def read(cls, uri: str) -> ArtifactMeta:
        return cls(read_meta(uri))

    @property
    def tokens(self) -> int:
        return self.raw["tokens"]

    @property
    def sequences(self) -> int:
        return self.raw["sequences"]

    @property
    def mean_loss(self) -> float:
        return self.raw["mean_loss"]

    @property
    def global_norm(self) -> float:
        return self.raw["global_norm"]

    @property
    def created_at(self) -> str:
        return self.raw["created_at"]

    @property
    def param_fingerprint(self) -> str:
        return self.raw["param_fingerprint"]

    @property
    def dtype(self) -> str:
        return self.raw["dtype"]

    @property
    def base_model(self) -> dict:
        """model_source() of the model ĝ_G was computed on."""
        return self.raw["base_model"]

    @property
    def base_model_name(self) -> str | None:
        return self.raw.get("base_model", {}).get("name_or_path")

    @property
    def parameters(self) -> dict[str, list[int]]:
        """Name → shape of every parameter ĝ_G covers."""
        return self.raw.get("parameters", {})

    @property
    def data_description(self) -> dict:
        return self.raw["data"]["description"]

    @property
    def data_fingerprint(self) -> str:
        return self.raw["data"]["fingerprint"]

    @property
    def description(self) -> str | None:
        return self.raw.get("description")

    @property
    def has_second_moment(self) -> bool:
        return bool(self.raw.get("has_second_moment"))

    @property
    def stage1_settings(self) -> dict | None:
        return self.raw.get("stage1_settings")

    @property
    def skipped_records(self) -> int:
        return self.raw.get("skipped_records", 0)

    @property
    def wall_s(self) -> float:
        """What reusing the artifact is charged: the wall time of the job that made it
        (older artifacts recorded only their streaming loop)."""
        return self.raw.get("wall_s", self.raw.get("loop_seconds", 0.0))

    @property
    def identity(self) -> list:
        """Which ĝ_G this is, for a run's identity: a new one means a new run."""
        return [self.created_at, self.data_fingerprint, self.global_norm]


@dataclass
class Stats:
    """What the Stage 1 pass saw; goes into meta.json."""

    tokens: int
    sequences: int
    batches: int
    loss_sum: float
    data_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in model.named_parameters()}


def fingerprint_of(shapes: dict[str, list[int]]) -> str:
    h = hashlib.sha256()
    for name, shape in shapes.items():
        h.update(f"{name}\t{tuple(shape)}\n".encode())
    return h.hexdigest()[:16]


def check_fingerprint(meta: ArtifactMeta, model: torch.nn.Module, model_name: str) -> None:
    shapes = parameter_shapes(model)
    if fingerprint_of(shapes) == meta.param_fingerprint:
        return
    theirs = meta.parameters
    diff = next(
        (f"{n}: {s} vs {theirs.get(n, 'absent')}" for n, s in shapes.items() if theirs.get(n) != s),
        next((f"{n}: absent vs {s}" for n, s in theirs.items() if n not in shapes), "?"),
    )
    raise UserError(
        f"global gradient was computed for model {meta.base_model_name or '?'!r} (fingerprint "
        f"{meta.param_fingerprint}), which does not match {model_name!r} (fingerprint "
        f"{fingerprint_of(shapes)}); first difference {diff}: compute ĝ_G for this model "
        "(dba-ray global-gradient) or point to the artifact made for it"
    )


def check_made_for(meta: ArtifactMeta, model: torch.nn.Module, model_name: str, uri: str) -> None:
    """Refuse an artifact computed for another architecture; warn when only the shapes
    say it fits (another model name: maybe a copy, maybe other weights)."""
    check_fingerprint(meta, model, model_name)
    if meta.base_model_name != model_name:
        log.warning(
            "ĝ_G at %s was computed on %s, not %s (same parameter shapes)", uri, meta.base_model_name, model_name
        )


def tensor_norms(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float(t.double().norm()) for n, t in tensors.items()}


def build_meta(
    mean: dict[str, torch.Tensor],
    shapes: dict[str, list[int]],
    stats: Stats,
    *,
    base_model: dict,
    data: dict,
    seq_len: int,
    dtype: str,
    description: str,
    has_second_moment: bool,
    norms: dict[str, float] | None = None,
) -> dict:
    """meta.json's content. ``norms``: each tensor's L2 norm, given when ``mean`` holds
    only this rank's rows of each tensor (a sharded Stage 1)."""
    norms = norms if norms is not None else tensor_norms(mean)
    return {
        "format_version": WHOLE_TENSORS_VERSION,
        "kind": KIND,
        "dba_ray_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "description": description,
        "base_model": base_model,
        "param_fingerprint": fingerprint_of(shapes),
        "parameters": shapes,
        "num_parameters": sum(math.prod(s) for s in shapes.values()),
        "tokens": stats.tokens,
        "sequences": stats.sequences,
        "batches": stats.batches,
        "mean_loss": stats.loss_sum / max(stats.tokens, 1),
        "data": {"description": data, "fingerprint": stats.data_fingerprint},
        "seq_len": seq_len,
        "dtype": dtype,
        "has_second_moment": has_second_moment,
        "norms": norms,
        "global_norm": math.sqrt(sum(v * v for v in norms.values())),
        **stats.extra,
    }


def _svd_compress(tensors: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    err_sq = total_sq = 0.0
    for name, t in tensors.items():
        norm_sq = float(t.double().pow(2).sum())
        total_sq += norm_sq
        if t.dim() != 2 or rank >= min(t.shape):
            out[name] = t
            continue
        u, s, vh = torch.linalg.svd(t.float(), full_matrices=False)
        # Factors in the tensor's own (save) dtype, so bfloat16 halves them too.
        us = (u[:, :rank] * s[:rank]).to(t.dtype).contiguous()
        v = vh[:rank].to(t.dtype).contiguous()
        resid_sq = float(s[rank:].double().pow(2).sum())
        errors[name] = math.sqrt(resid_sq / norm_sq) if norm_sq > 0 else 0.0
        err_sq += resid_sq
        out[f"{name}.svd_us"], out[f"{name}.svd_vh"] = us, v
    info = {
        "kind": "svd",
        "rank": rank,
        "relative_error": math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0,
        "relative_error_per_tensor": errors,
    }
    return out, info


def _decompress(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name.endswith(".svd_vh"):
            continue
        if name.endswith(".svd_us"):
            base = name.removesuffix(".svd_us")
            out[base] = (t.float() @ tensors[f"{base}.svd_vh"].float()).to(t.dtype)
        else:
            out[name] = t
    return out


def _shards(prefix: str, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[tuple[str, dict]]:
    groups: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t.contiguous()
        size += nbytes
    n = len(groups)
    return [(f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def save(
    uri: str,
    grad: GlobalGradient,
    *,
    overwrite: bool = False,
    svd_rank: int | None = None,
    save_dtype: str = "float32",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict:
    """Write the artifact atomically from one process holding whole tensors; return the
    meta written."""
    mean = _cast(grad.mean, save_dtype)
    meta = dict(grad.meta, save_dtype=save_dtype, compression=None)
    if svd_rank is not None:
        mean, meta["compression"] = _svd_compress(mean, svd_rank)
    parts = {"mean_gradient": mean}
    if grad.second_moment is not None:
        parts["second_moment"] = _cast(grad.second_moment, save_dtype)
    with storage.atomic_directory(uri, overwrite=overwrite, marker=META) as target:
        meta["files"] = write_parts(target, parts, max_shard_bytes=max_shard_bytes)
        write_meta(target, meta)
    return meta


def _cast(tensors: dict[str, torch.Tensor], save_dtype: str) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu", getattr(torch, save_dtype)) for n, t in tensors.items()}


def write_parts(
    target: str,
    parts: dict[str, dict[str, torch.Tensor]],
    *,
    save_dtype: str | None = None,
    block: tuple[int, int] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict[str, dict]:
    """Write each part's tensors into files under ``target``; their meta.json entries.
    ``block`` = (rank, world): the tensors are that rank's dim-0 rows of each tensor
    (a sharded Stage 1; every rank writes its own files, the format of
    ``dba_ray.row_blocks``), recorded in each file's entry."""
    files = {}
    for part, tensors in parts.items():
        prefix = part if block is None else f"{part}-rank-{block[0]:05d}-of-{block[1]:05d}"
        tensors = tensors if save_dtype is None else _cast(tensors, save_dtype)
        for fname, group in _shards(prefix, tensors, max_shard_bytes):
            blob = st_save(group, metadata={"kind": KIND, "part": part})
            storage.write_bytes_atomic(storage.join(target, fname), blob)
            files[fname] = {"part": part, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            if block is not None:
                files[fname]["rank"], files[fname]["ranks"] = block
    return files


def write_meta(target: str, meta: dict) -> None:
    """Last: the marker that makes the artifact complete."""
    storage.write_bytes_atomic(storage.join(target, META), json.dumps(meta, indent=1).encode())


def read_meta(uri: str) -> dict:
    meta_uri = storage.join(uri, META)
    if not storage.exists(uri):
        raise UserError(f"global-gradient artifact not found: {uri}")
    if not storage.exists(meta_uri):
        raise UserError(
            f"{uri} is not a complete global-gradient artifact (no {META}; an interrupted or unfinished write?)"
        )
    try:
        meta = json.loads(storage.read_bytes(meta_uri))
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_uri} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise UserError(f"{uri} is not a dba-ray global-gradient artifact")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(
            f"{uri} has format version {meta['format_version']}; this dba-ray reads "
            f"up to {FORMAT_VERSION} (upgrade dba-ray)"
        )
    return meta


def load(uri: str, *, verify: bool = False, rows: Rows | None = None) -> GlobalGradient:
    """Read an artifact; ``verify`` also checks every file's sha256.

    The files are memory-mapped (a remote artifact is first copied to the machine's
    cache, ``storage.local_copy``), so only the bytes a tensor needs are read, and a
    tensor kept as it is stays backed by the file. ``rows``: for each named parameter,
    the dim-0 rows ``(start, stop)`` to read of ĝ_G and v_G, as an FSDP rank holds them
    (``sharding.local_rows``); a rank then holds about 1/world of the artifact.
    Parameters it does not name are read whole.
    """
    meta, directory = check_files(uri, checksums=verify)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    blocks: dict[str, list[tuple[int, str]]] = {}  # part -> (rank, file) of a sharded write
    world: dict[str, int] = {}  # part -> how many ranks wrote it
    for fname, info in meta["files"].items():
        path = os.path.join(directory, fname)
        if "rank" in info:
            blocks.setdefault(info["part"], []).append((info["rank"], path))
            world[info["part"]] = info["ranks"]
        else:
            parts.setdefault(info["part"], {}).update(_read(path, rows or {}))
    for part, files in blocks.items():
        if {rank for rank, _ in files} != set(range(world[part])):
            raise UserError(f"artifact {uri} is incomplete: {part} lacks the rows of some ranks")
        reader = RowBlocks(files)
        parts[part] = {name: reader.read(name, *(rows or {}).get(name, (0, None))) for name in reader.keys()}
    mean = _decompress(parts.get("mean_gradient", {}))
    missing = set(meta["parameters"]) - set(mean)
    if missing:
        raise UserError(f"artifact {uri} lacks tensors: {sorted(missing)[:3]}")
    return GlobalGradient(mean=mean, meta=meta, second_moment=parts.get("second_moment"))


def mean_tensor(uri: str, name: str) -> torch.Tensor | None:
    """ĝ_G's tensor ``name`` whole and alone, without reading the rest of the artifact
    (a sharded write's row blocks pieced together); None when it is stored SVD-compressed."""
    meta, directory = check_files(uri, checksums=False)
    files = [
        (info.get("rank", 0), os.path.join(directory, fname))
        for fname, info in meta["files"].items()
        if info["part"] == "mean_gradient"
    ]
    reader = RowBlocks(files)
    return reader.read(name) if name in reader.keys() else None


def check_files(uri: str, checksums: bool = True) -> tuple[dict, str]:
    """Every file meta.json lists is there with its size (and, with ``checksums``, its
    sha256), read file by file without building any tensor; (meta, local directory)."""
    meta = read_meta(uri)
    directory = storage.local_copy(uri, META)
    for fname, info in meta["files"].items():
        path = os.path.join(directory, fname)
        if not os.path.exists(path):
            raise UserError(f"artifact {uri} is incomplete: {fname} is missing")
        if os.path.getsize(path) != info["bytes"] or (checksums and _sha256(path) != info["sha256"]):
            raise UserError(f"artifact {uri} is corrupt: {fname} does not match meta.json")
    return meta, directory


def _read(path: str, rows: Rows) -> dict[str, torch.Tensor]:
    """The tensors of one file: backed by the mapped file when read whole, the asked
    rows copied out otherwise (an SVD factor U·S holds W's rows; V^T is needed whole)."""
    with safe_open(path, framework="pt") as f:
        spans = {name: rows.get(name.removesuffix(".svd_us")) for name in f.keys()}
        out = {name: f.get_tensor(name) for name, span in spans.items() if span is None}
    for name, span in spans.items():
        if span is not None:
            # A mapping of its own, dropped once the rows are copied: the kernel maps a
            # file in whole folios (2 MB here), so one mapping shared by small tensors
            # would keep most of the file resident.
            with safe_open(path, framework="pt") as f:
                out[name] = f.get_slice(name)[span[0] : span[1]].clone()
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024**2):
            h.update(chunk)
    return h.hexdigest()


def select_rows(tensors: dict[str, torch.Tensor] | None, rows: Rows) -> dict[str, torch.Tensor] | None:
    """The ``rows`` of whole tensors already in memory (an artifact from the object
    store), as copies, so the whole tensors can be freed."""
    if tensors is None:
        return None
    return {n: t[rows[n][0] : rows[n][1]].clone() if n in rows else t for n, t in tensors.items()}


def load_any(source, model: torch.nn.Module | None = None, model_name: str = "the model", rows: Rows | None = None):
    """Load from a path/URI or from an ObjectRef made by Stage 1, checking the model;
    ``rows`` as for ``load``."""
    if isinstance(source, ray.ObjectRef):
        grad = ray.get(source)
        if rows is not None:
            grad.mean, grad.second_moment = select_rows(grad.mean, rows), select_rows(grad.second_moment, rows)
    else:
        grad = load(str(source), rows=rows)
    if model is not None:
        grad.check_model(model, model_name)
    return grad
