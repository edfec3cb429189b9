"""Reading source files into validated, normalized records.

Every record leaves here in one of three shapes, whatever the source:
``text`` -> {text}; ``instruction`` -> {instruction, input, output};
``chat`` -> {messages (JSON string)}; plus ``_source``, where it came from
("file:line"), so that a later failure can still name it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from dba_ray import storage
from dba_ray.config import DataConfig
from dba_ray.errors import UserError

log = logging.getLogger(__name__)

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")

COLUMNS = {
    "text": ["text"],
    "instruction": ["instruction", "input", "output"],
    "chat": ["messages"],
}


def in_validation(key: str) -> bool:
    """The validation slice (``subset: validation``): a fixed tenth of the records, chosen
    by hash digits 8–16, which the shared corpora's train/eval split (digits 0–8) does
    not use, so validation is carved out of a training file independently of its eval file."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[8:16], 16) % 10 == 0


def _subset_key(norm: dict) -> str:
    return norm["text"] if "text" in norm else json.dumps(norm, sort_keys=True)


def in_subset(norm: dict, subset: str) -> bool:
    """Whether a normalized record belongs to ``subset`` (all, train or validation)."""
    return subset == "all" or in_validation(_subset_key(norm)) == (subset == "validation")


class BadRecord(ValueError):
    """One record that does not fit the configured format."""


def file_format(uri: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = uri.lower()
    for ext in _COMPRESSED:
        name = name.removesuffix(ext)
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    raise UserError(
        f"cannot tell the format of {uri} from its extension (known: {', '.join(_EXTENSIONS)}); set file_format"
    )


def normalize(record: Any, cfg: DataConfig) -> dict:
    """Check one record against ``cfg.format`` and return its normalized fields."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected an object, got {type(record).__name__}")
    if cfg.format == "text":
        text = record.get(cfg.text_field)
        if not isinstance(text, str):
            raise BadRecord(f"field '{cfg.text_field}' missing or not a string")
        return {"text": text}
    if cfg.format == "instruction":
        out = {}
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise BadRecord(f"field '{key}' missing or not a string")
            out[key] = record[key]
        inp = record.get("input") or ""
        if not isinstance(inp, str):
            raise BadRecord("field 'input' is not a string")
        out["input"] = inp
        return out
    messages = record.get(cfg.messages_field)
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise BadRecord(f"field '{cfg.messages_field}' is a string but not JSON") from None
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"field '{cfg.messages_field}' missing or not a non-empty list")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRecord(f"message {i} needs string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message to learn from")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"messages": json.dumps(clean)}


# Longest line read from a JSON Lines or text file. A longer one is a malformed record:
# it would be held whole in memory and tokenized in one piece.
MAX_LINE_CHARS = 16 * 2**20


def _raw_records(uri: str, fmt: str, cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    """(location, raw record) pairs of one file; a raw record may be a BadRecord."""
    try:
        yield from _file_records(uri, fmt, cfg)
    except (OSError, EOFError, pa.ArrowException) as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(
            f"cannot read {uri} as {fmt}: {reason}; a truncated or corrupt file? Replace it or remove it from the data"
        ) from None


def _lines(text: io.TextIOWrapper) -> Iterator[str | None]:
    """The file's lines, each read with bounded memory; None stands for a line longer
    than MAX_LINE_CHARS, which is skipped."""
    while line := text.readline(MAX_LINE_CHARS + 1):
        if len(line) <= MAX_LINE_CHARS or line.endswith("\n"):
            yield line
            continue
        while line and not line.endswith("\n"):
            line = text.readline(MAX_LINE_CHARS + 1)
        yield None


def _file_records(uri: str, fmt: str, cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    fs, path = storage.filesystem_and_path(uri)
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    row += 1
                    yield f"{uri}: row {row}", rec
        return
    with fs.open_input_stream(path, compression="detect") as raw:
        # Undecodable bytes become surrogates, so a bad line is found and named by its
        # own number (a strict decoder fails on the whole chunk it decodes ahead).
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline=None)
        if fmt == "json":
            try:
                data = json.loads(text.read().encode("utf-8"))
            except UnicodeEncodeError:
                yield f"{uri}", BadRecord("not valid UTF-8")
                return
            except json.JSONDecodeError as e:
                yield f"{uri}", BadRecord(f"not valid JSON ({e})")
                return
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                yield f"{uri}", BadRecord("a .json file must hold a list of records")
                return
            for i, rec in enumerate(data):
                yield f"{uri}: record {i}", rec
            return
        lineno = 0
        para: list[str] = []
        para_start = 1
        for line in _lines(text):
            lineno += 1
            if line is None:
                yield (
                    f"{uri}:{lineno}",
                    BadRecord(f"line longer than {MAX_LINE_CHARS:,} characters (split it into smaller records)"),
                )
                continue
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                yield f"{uri}:{lineno}", BadRecord("not valid UTF-8")
                continue
            if fmt == "jsonl":
                if not line.strip():
                    continue
                try:
                    yield f"{uri}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{uri}:{lineno}", BadRecord(f"not valid JSON ({e.msg})")
            elif cfg.sample_by == "line":
                if line.strip():
                    yield f"{uri}:{lineno}", {cfg.text_field: line.rstrip("\n")}
            elif cfg.sample_by == "paragraph" and not line.strip():
                if para:
                    yield f"{uri}:{para_start}", {cfg.text_field: "".join(para).strip()}
                para, para_start = [], lineno + 1
            else:
                para.append(line)
        if fmt == "text" and cfg.sample_by != "line" and "".join(para).strip():
            yield f"{uri}:{para_start}", {cfg.text_field: "".join(para).strip()}


class _Columns:
    """Normalized records as column lists; a bad record fails the run or is counted."""

    def __init__(self, cfg: DataConfig, quote_record: bool = False):
        self.cfg = cfg
        # Parsed rows (Hugging Face) have no line number: quote the record instead.
        self.quote_record = quote_record
        self.names = COLUMNS[cfg.format] + ["_source"]
        self.out: dict[str, list] = {c: [] for c in self.names}
        self.skipped, self.first_skip = 0, None

    def add(self, loc: str, rec: Any) -> None:
        try:
            if isinstance(rec, BadRecord):
                raise rec
            norm = normalize(rec, self.cfg)
        except BadRecord as e:
            where = f"at {loc}"
            if self.quote_record:
                where = f"in {loc} (record {json.dumps(rec, default=str)[:120]})"
            if self.cfg.on_bad_record == "fail":
                raise UserError(
                    f"malformed record {where}: {e} (set on_bad_record: skip to skip such records)"
                ) from None
            self.skipped += 1
            self.first_skip = self.first_skip or f"{loc}: {e}"
            return
        if not in_subset(norm, self.cfg.subset):
            return
        for k, v in norm.items():
            self.out[k].append(v)
        self.out["_source"].append(loc)

    def __len__(self) -> int:
        return len(self.out["_source"])

    def take(self) -> dict[str, list]:
        out, self.out = self.out, {c: [] for c in self.names}
        return out

    def report_skipped(self, tracker, where: str, whole_file: bool = False) -> None:
        if self.skipped:
            log.warning("skipped %d malformed records in %s, first: %s", self.skipped, where, self.first_skip)
            if tracker is not None:
                # Waited for: a count still in flight when the dataset finishes would be
                # missing from the driver's summary.
                key = where if whole_file else None
                ray.get(tracker.add_skipped.remote(self.skipped, self.first_skip, key))
        self.skipped, self.first_skip = 0, None


def check_file(uri: str, cfg: DataConfig, max_records: int | None = None) -> tuple[int, int, str | None]:
    """Read one file's records (its first ``max_records``, or all) exactly as ReadFiles
    will, without Ray: a malformed one fails here (under ``on_bad_record: fail``).
    Returns (records kept, records skipped, the first skipped one)."""
    cols, kept = _Columns(cfg), 0
    for n, (loc, rec) in enumerate(_raw_records(uri, file_format(uri, cfg.file_format), cfg)):
        if n == max_records:
            break
        cols.add(loc, rec)
        kept += len(cols.take()["_source"])
    return kept, cols.skipped, cols.first_skip


class ReadFiles:
    """Ray Data map_batches function: file names in, normalized records out.

    A generator, so one large file streams out in bounded batches.
    """

    def __init__(self, cfg: DataConfig, tracker=None, rows_per_batch: int = 1024):
        self.cfg = cfg
        self.tracker = tracker
        self.rows_per_batch = rows_per_batch

    def __call__(self, batch: dict) -> Iterator[dict]:
        cols = _Columns(self.cfg)
        for uri, fmt in zip(batch["file"], batch["fmt"]):
            for loc, rec in _raw_records(str(uri), str(fmt), self.cfg):
                cols.add(loc, rec)
                if len(cols) >= self.rows_per_batch:
                    yield cols.take()
            cols.report_skipped(self.tracker, str(uri), whole_file=True)
        if len(cols):
            yield cols.take()


class NormalizeRows:
    """Ray Data map_batches function for Hugging Face rows (already parsed)."""

    def __init__(self, cfg: DataConfig, origin: str, tracker=None):
        self.cfg = cfg
        self.origin = origin
        self.tracker = tracker

    def __call__(self, batch: dict) -> dict:
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        cols = _Columns(self.cfg, quote_record=True)
        for i in range(n):
            cols.add(self.origin, {k: _plain(batch[k][i]) for k in keys})
        cols.report_skipped(self.tracker, self.origin)
        return cols.take()


def _plain(value: Any) -> Any:
    """numpy values from a Ray Data batch -> plain Python, for validation."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _driver_records(cfg: DataConfig, need: str, check: Callable[[Any], dict]) -> list[dict]:
    """Every record of ``cfg``'s files in ``cfg.subset``, in file order, through
    ``check``, on the driver (evaluation sets are small); a malformed one stops the run
    with its file and line. ``need``: what asks for data.path, for the message."""
    if cfg.path is None:
        raise UserError(f"{need} needs data.path (JSON Lines, JSON or Parquet)")
    out = []
    for uri, _ in storage.list_files(cfg.path):
        for loc, rec in _raw_records(uri, file_format(uri, cfg.file_format), cfg):
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                record = check(rec)
            except BadRecord as e:
                raise UserError(f"malformed record at {loc}: {e}") from None
            if in_subset(record, cfg.subset):
                out.append(record)
    return out


def _choice_record(rec: Any) -> dict:
    if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
        raise BadRecord("field 'question' missing or not a string")
    choices = rec.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise BadRecord("field 'choices' must be a list of at least 2 strings")
    answer = rec.get("answer")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise BadRecord("field 'answer' must be the index of the right choice")
    return {"question": rec["question"], "choices": choices, "answer": answer}


def read_choice_records(cfg: DataConfig) -> list[dict]:
    """Multiple-choice records {question, choices, answer}."""
    out = _driver_records(cfg, "a choice eval set", _choice_record)
    if not out:
        which = f" (subset {cfg.subset})" if cfg.subset != "all" else ""
        raise UserError(f"choice eval set {cfg.path} is empty{which}")
    return out


def read_text_records(cfg: DataConfig) -> list[str]:
    """The texts of a text eval set's records (a per-record set scores each alone)."""
    return [r["text"] for r in _driver_records(cfg, "a per-record eval set", lambda rec: normalize(rec, cfg))]
