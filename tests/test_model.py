"""Loading models and tokenizers by path, as a hub model would load (no network)."""

import pytest
import torch

from dba_ray.config import ModelConfig
from dba_ray.errors import UserError
from dba_ray.model import load_model
from dba_ray.tokenizer import byte_tokenizer, load_tokenizer


def test_saved_model_loads_by_path_with_dtype(tmp_path):
    model = load_model(ModelConfig())
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"), dtype="bfloat16")
    loaded = load_model(cfg)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for (n, a), (m, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n == m and torch.equal(a.to(torch.bfloat16), b)
    tok = load_tokenizer(cfg)
    assert tok("hello")["input_ids"] == byte_tokenizer()("hello")["input_ids"]
    assert tok.chat_template == byte_tokenizer().chat_template


def test_builtin_model_is_seeded_and_resizable():
    a, b = load_model(ModelConfig()), load_model(ModelConfig())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = load_model(ModelConfig(seed=1))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    big = load_model(ModelConfig(builtin_config={"num_hidden_layers": 3}))
    assert len(big.model.layers) == 3


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load model"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nothing-here")))
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nothing-here")))
