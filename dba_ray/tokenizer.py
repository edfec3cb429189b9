"""Tokenizers: any Hugging Face tokenizer by name or path (an ``s3://`` / ``gs://``
folder is copied to a local cache first), and ``builtin:bytes``, a byte-level tokenizer
built in code. Apart from dba_ray.model so that the processes that only tokenize (Ray
Data's tokenizing tasks) do not import transformers' model classes: importing
dba_ray.data.tokenize went from 7.4 to 4.3 CPU-s.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dba_ray import storage
from dba_ray.config import ModelConfig
from dba_ray.errors import UserError

# The builtin model's name is here, not in dba_ray.model (which imports it from here):
# load_tokenizer gives that model the byte tokenizer.
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
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")

_SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]


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
            storage.local_copy(name, "config.json", skip=WEIGHT_SUFFIXES),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {name!r}: {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {name!r} has no EOS token, needed to separate documents")
    return tok
