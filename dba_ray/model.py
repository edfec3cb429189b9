"""Loading causal LMs, plus a download-free builtin model for tests.

Any Hugging Face causal LM loads by name or path, or from an ``s3://`` / ``gs://``
directory (a ``save_pretrained`` output whose ``config.json`` marks it complete), which
is first copied to a local cache. ``builtin:tiny-llama`` is a small Llama built from a
config in code (seeded random weights), with dba_ray.tokenizer's byte-level tokenizer:
neither needs a network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.utils import GENERATION_CONFIG_NAME

from dba_ray import storage
from dba_ray.config import ModelConfig
from dba_ray.errors import UserError
from dba_ray.tokenizer import BUILTIN_MODEL, WEIGHT_SUFFIXES, byte_tokenizer

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
    memory and no weights read, to check an artifact against it cheaply, or for a rank
    to read its rows into (sharding.load_sharded). A saved generation config comes with
    it, as from_pretrained gives it: an export keeps its sampling defaults and EOS ids."""
    with torch.device("meta"):
        if cfg.name_or_path == BUILTIN_MODEL:
            return load_model(cfg)
        folder = storage.local_copy(cfg.name_or_path, "config.json", skip=WEIGHT_SUFFIXES)
        try:
            config = AutoConfig.from_pretrained(folder, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model {cfg.name_or_path!r}: {str(e).splitlines()[0]}") from None
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    if (Path(folder) / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def weight_files(cfg: ModelConfig) -> list[str]:
    """The safetensors files of a saved model (none for the builtin model, or a model
    stored in another format)."""
    if cfg.name_or_path == BUILTIN_MODEL:
        return []
    folder = storage.local_copy(cfg.name_or_path, "config.json")
    return sorted(str(p) for p in Path(folder).glob("*.safetensors"))


def shape_only(cfg: ModelConfig) -> bool:
    """A local folder with a model's config and no weight files: a shape to plan for."""
    folder = Path(cfg.name_or_path)
    if storage.is_remote(cfg.name_or_path) or not (folder / "config.json").is_file():
        return False
    return not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir())


def model_source(cfg: ModelConfig) -> dict:
    """How the base model was named, for artifact metadata."""
    src = {"name_or_path": cfg.name_or_path, "revision": cfg.revision}
    if cfg.name_or_path == BUILTIN_MODEL:
        src["seed"] = cfg.seed
        src["builtin_config"] = cfg.builtin_config
    return src
