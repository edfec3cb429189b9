"""Loading causal LMs and tokenizers, plus a download-free builtin pair for tests.

Any Hugging Face causal LM loads by name or path, or from an ``s3://`` / ``gs://``
directory (a ``save_pretrained`` output whose ``config.json`` marks it complete), which
is first copied to a local cache. ``builtin:tiny-llama`` is a small
Llama built from a config in code (seeded random weights) and ``builtin:bytes`` a
byte-level tokenizer built in code: neither needs a network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from dba_ray import storage
from dba_ray.config import ModelConfig
from dba_ray.errors import UserError

BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_TOKENIZER = "builtin:bytes"

# A chat template for the byte tokenizer: role headers, each turn closed by EOS, and the
# `generation` markers that let the loss mask find the assistant's tokens.
_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ m['content'] }}"
    "<|eos|>{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Weight files, left out when only a model's config is needed.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")

_SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# The builtin model: small enough for CI, a real Llama architecture.
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens plus a few special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def load_tokenizer(cfg: ModelConfig):
    name = cfg.tokenizer or cfg.name_or_path
    if name in (BUILTIN_TOKENIZER, BUILTIN_MODEL):
        return byte_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(
            storage.local_copy(name, "config.json", skip=_WEIGHTS),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {name!r}: {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {name!r} has no EOS token, needed to separate documents")
    return tok


def load_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model on CPU in ``cfg.dtype``; the same weights on every call."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.name_or_path == BUILTIN_MODEL:
        tok = byte_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **{**TINY_LLAMA, **cfg.builtin_config},
        )
        # Seed locally so every Ray worker builds identical weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = LlamaForCausalLM(config)
        return model.to(dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(
            storage.local_copy(cfg.name_or_path, "config.json"),
            revision=cfg.revision,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {cfg.name_or_path!r}: {str(e).splitlines()[0]}") from None


def load_empty_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model's architecture on the meta device: parameter names and shapes with no
    memory and no weights read, to check an artifact against it cheaply."""
    with torch.device("meta"):
        if cfg.name_or_path == BUILTIN_MODEL:
            return load_model(cfg)
        try:
            config = AutoConfig.from_pretrained(
                storage.local_copy(cfg.name_or_path, "config.json", skip=_WEIGHTS),
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
            )
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model {cfg.name_or_path!r}: {str(e).splitlines()[0]}") from None
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)


def weight_files(cfg: ModelConfig) -> list[str]:
    """The safetensors files of a saved model (none for the builtin model, or a model
    stored in another format)."""
    if cfg.name_or_path == BUILTIN_MODEL:
        return []
    folder = storage.local_copy(cfg.name_or_path, "config.json")
    return sorted(str(p) for p in Path(folder).glob("*.safetensors"))


def model_source(cfg: ModelConfig) -> dict:
    """How the base model was named, for artifact metadata."""
    src = {"name_or_path": cfg.name_or_path, "revision": cfg.revision}
    if cfg.name_or_path == BUILTIN_MODEL:
        src["seed"] = cfg.seed
        src["builtin_config"] = cfg.builtin_config
    return src
