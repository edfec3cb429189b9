"""Turning normalized records into fixed-length training sequences.

Output rows: ``input_ids`` and ``labels`` (int32, length seq_len). ``labels`` is -100
where a token is not trained on (padding; the prompt of instruction and chat records).
Like Hugging Face models, position i's label is the token at i and the loss shift
happens in the loss, so a sequence's trained tokens are ``labels[1:] != -100``.
"""

from __future__ import annotations

import functools
import hashlib
import json

import numpy as np

from dba_ray.config import DataConfig, ModelConfig
from dba_ray.errors import UserError
from dba_ray.tokenizer import load_tokenizer

IGNORE = -100


def instruction_prompt(instruction: str, input_text: str) -> str:
    """The prompt an instruction record is rendered to (its output follows)."""
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def pad_rows(rows: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> dict:
    """(tokens, labels) pairs -> [N, seq_len] int32 arrays, padded (labels with IGNORE)."""
    ids = np.full((len(rows), seq_len), pad, dtype=np.int32)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int32)
    for k, (toks, labs) in enumerate(rows):
        ids[k, : len(toks)] = toks
        labels[k, : len(labs)] = labs
    return {"input_ids": ids, "labels": labels}


def tokenize_batch(batch: dict, model_json: str, data_json: str, keys: bool = False) -> dict:
    """Ray Data map_batches function. It runs as a plain task, so the worker processes
    Ray keeps warm are reused across datasets (an actor pool would start, and import
    torch and transformers in, a new process for every dataset); the tokenizer is loaded
    once per process and configuration. ``keys``: add each sequence's ``key``."""
    out = _tokenizer(model_json, data_json)(batch)
    if keys:
        out["key"] = sequence_keys(batch, len(out["input_ids"]))
    return out


def sequence_keys(batch: dict, n: int) -> np.ndarray:
    """An int64 name for each of the ``n`` sequences made from ``batch``: a hash of the
    batch's records (with their sources: file and line) and the sequence's place among
    them. It names a sequence wherever the stream hands it, so a resumed Stage 1 can
    skip what its checkpoint counted; two sequences share a name only if they come
    from two identical batches of records from the same place (2^-64 otherwise)."""
    h = hashlib.blake2b(digest_size=8)
    for column in sorted(batch):
        h.update(column.encode())
        for value in batch[column]:
            h.update(str(value).encode("utf-8", "surrogateescape") + b"\x00")
    seed = h.digest()
    keys = [hashlib.blake2b(k.to_bytes(8, "little"), digest_size=8, key=seed).digest() for k in range(n)]
    return np.frombuffer(b"".join(keys), dtype=np.int64).copy()


@functools.lru_cache(maxsize=4)
def _tokenizer(model_json: str, data_json: str) -> Tokenize:
    return Tokenize(ModelConfig.model_validate_json(model_json), DataConfig.model_validate_json(data_json))


class Tokenize:
    """Records -> sequences with one loaded tokenizer."""

    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig):
        self.cfg = data_cfg
        self.tok = load_tokenizer(model_cfg)
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        if data_cfg.format == "chat" and not getattr(self.tok, "chat_template", None):
            raise UserError(
                f"tokenizer of {model_cfg.tokenizer or model_cfg.name_or_path!r} has no "
                "chat template, which format: chat needs"
            )

    def __call__(self, batch: dict) -> dict:
        if self.cfg.format == "text":
            rows = self._pack(list(batch["text"]))
        elif self.cfg.format == "instruction":
            rows = [
                self._one(instruction_prompt(str(i), str(x)), str(o))
                for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])
            ]
            rows = [r for r in rows if r is not None]
        else:
            rows = [self._chat(json.loads(str(m))) for m in batch["messages"]]
            rows = [r for r in rows if r is not None]
        return pad_rows(rows, self.cfg.seq_len, self.pad)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def _pack(self, texts: list[str]):
        """Concatenate documents with EOS after each, cut into seq_len pieces; the
        last piece of the batch is padded (its padding is not trained on)."""
        stream: list[int] = []
        for ids in self._ids(texts):
            stream.extend(ids)
            stream.append(self.eos)
        L = self.cfg.seq_len
        return [(stream[i : i + L], stream[i : i + L]) for i in range(0, len(stream), L)]

    def _one(self, prompt: str, response: str):
        p, r = self._ids([prompt, response])
        return self._masked(p, r + [self.eos])

    def _masked(self, prompt_ids: list[int], response_ids: list[int]):
        toks = (prompt_ids + response_ids)[: self.cfg.seq_len]
        labs = ([IGNORE] * len(prompt_ids) + response_ids)[: self.cfg.seq_len]
        # A prompt longer than seq_len leaves nothing to learn: drop the row.
        return (toks, labs) if any(x != IGNORE for x in labs[1:]) else None

    def _chat(self, messages: list[dict]):
        """Train only on assistant turns. Each turn's tokens are found by rendering the
        conversation up to it with and without it, which works for any template that
        renders a prefix of a conversation as a prefix of its tokens."""

        def render(msgs, gen):
            out = self.tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=True)
            return list(out["input_ids"])

        toks = render(messages, False)
        labs = [IGNORE] * len(toks)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(render(messages[:i], True)) if i else 0
            end = len(render(messages[: i + 1], False))
            labs[start:end] = toks[start:end]
        toks, labs = toks[: self.cfg.seq_len], labs[: self.cfg.seq_len]
        return (toks, labs) if any(x != IGNORE for x in labs[1:]) else None


def choice_arrays(records: list[dict], tok, seq_len: int) -> dict[str, np.ndarray]:
    """One row per (record, choice): "question\nAnswer:" then " choice"; only the
    choice's tokens are labelled, so a row's loss is the choice's log-likelihood.
    ``group`` maps rows to records; ``answers`` holds each record's right index."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows, group = [], []
    for r, rec in enumerate(records):
        prompt = tok(f"{rec['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        for choice in rec["choices"]:
            cont = tok(f" {choice}", add_special_tokens=False)["input_ids"]
            # Keep the end of a long prompt: the choice must fit whole.
            toks = (prompt + cont)[-seq_len:]
            labs = ([IGNORE] * len(prompt) + cont)[-seq_len:]
            rows.append((toks, labs))
            group.append(r)
    return {
        **pad_rows(rows, seq_len, pad),
        "group": np.asarray(group, dtype=np.int32),
        "answers": np.asarray([rec["answer"] for rec in records], dtype=np.int32),
    }


def record_arrays(texts: list[str], tok, seq_len: int) -> dict[str, np.ndarray]:
    """Each text tokenized alone with EOS after it and cut into ``seq_len`` pieces, never
    packed with another; ``record`` maps rows to texts, so sums can be kept per record."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows, record = [], []
    for r, ids in enumerate(tok(texts, add_special_tokens=False)["input_ids"]):
        ids = [*ids, tok.eos_token_id]
        for i in range(0, len(ids), seq_len):
            rows.append((ids[i : i + seq_len], ids[i : i + seq_len]))
            record.append(r)
    return {**pad_rows(rows, seq_len, pad), "record": np.asarray(record, dtype=np.int32)}
