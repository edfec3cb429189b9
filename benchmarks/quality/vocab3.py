"""The third protocol's vocabulary and base model directory (PROTOCOL3.md §1).

- ``train_tokenizer``: byte-level BPE of 8,192 tokens, trained on general3/train.jsonl
  only, saved as a ``PreTrainedTokenizerFast`` directory (EOS ``<|endoftext|>``).
- ``write_model_dir``: the untied Llama (3,284,608 parameters) with that tokenizer,
  initialised under ``torch.manual_seed(0)``: the directory pretraining starts from.
- ``row_usage``: which embedding rows a corpus's tokens touch, and the counts the
  protocol reports (general rows used, a domain's, general rows a domain never uses).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dba_ray.data.records import in_subset

VOCAB = 8192
EOS, PAD = "<|endoftext|>", "<|pad|>"
ARCH = dict(
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=344,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
PARAMETERS = 3_284_608  # PROTOCOL3 §1's count; write_model_dir checks it


def texts(path: Path, subset: str = "all") -> Iterator[str]:
    """The ``text`` of every record of a JSON Lines file in ``subset`` (the library's
    train / validation rule, so counts match what a run reads)."""
    with path.open() as f:
        for line in f:
            rec = {"text": json.loads(line)["text"]}
            if in_subset(rec, subset):
                yield rec["text"]


def train_tokenizer(train_jsonl: Path, out: Path, vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """Train the BPE on ``train_jsonl`` and save it to ``out`` (reused when present).
    The pre-tokenizer adds no prefix space (as GPT-2's), so decoding gives the text back."""
    if (out / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(out))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS, PAD],
    )
    tok.train_from_iterator(texts(train_jsonl), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def write_model_dir(tok: PreTrainedTokenizerFast, out: Path, arch: dict | None = None) -> Path:
    """The base model before pretraining: config, tokenizer and seed-0 weights (``arch``:
    a smaller shape for the smoke setting)."""
    if (out / "config.json").exists():
        return out
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **(arch or ARCH),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    if arch is None and n != PARAMETERS:
        raise SystemExit(f"the model has {n:,} parameters, PROTOCOL3 §1 says {PARAMETERS:,}")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def rows_used(tok: PreTrainedTokenizerFast, docs: Iterable[str]) -> set[int]:
    """Token ids of ``docs``, each tokenized alone with EOS after it (as a run packs them)."""
    ids = {tok.eos_token_id}
    for text in docs:
        ids.update(tok(text, add_special_tokens=False)["input_ids"])
    return ids


def row_usage(tok: PreTrainedTokenizerFast, general: Path, domains: dict[str, Path]) -> dict:
    """The protocol's coverage counts: rows general train text uses, each domain's train
    subset's, and the general-used rows a domain never uses (f of §6 as a fraction)."""
    general_rows = rows_used(tok, texts(general))
    out = {"vocab": len(tok), "general_rows": len(general_rows), "domains": {}}
    for name, path in domains.items():
        rows = rows_used(tok, texts(path, "train"))
        missing = general_rows - rows
        out["domains"][name] = {
            "rows": len(rows),
            "general_rows_unused": len(missing),
            "f": len(missing) / len(general_rows),
        }
    return out
