"""Under stage1.parallel fsdp each rank reads only its rows of a saved model's weights:
real Gloo processes build the model on the meta device, shard it, read their rows, and
must hold exactly the rows, buffers and loss of the whole model loaded the usual way."""

import json
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks
from transformers import Qwen2Config, Qwen2ForCausalLM

from dba_ray import sharding
from dba_ray.config import ModelConfig
from dba_ray.loss import token_loss_sum
from dba_ray.model import load_model
from dba_ray.tokenizer import byte_tokenizer


def _save_qwen2(folder) -> None:
    """A tiny Qwen2 (tied embeddings, grouped KV heads), saved as a user's model is."""
    tok = byte_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=6,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = ModelConfig(name_or_path=folder)
    model, rows_only = sharding.load_sharded(cfg, torch.device("cpu"), sum_gradients=True)
    whole = dict(load_model(cfg).named_parameters())
    rows = sharding.local_rows(model)
    same_rows = all(
        torch.equal(p.to_local(), whole[n][slice(*rows[n])]) for n, p in model.named_parameters()
    )  # fmt: skip
    whole_model = load_model(cfg)
    same_buffers = all(
        torch.equal(b, dict(whole_model.named_buffers())[n]) for n, b in model.named_buffers()
    )  # fmt: skip
    ids = torch.arange(6, 6 + 2 * 20).reshape(2, 20) % 200
    with torch.no_grad():
        loss = float(token_loss_sum(model.eval(), ids, ids)[0])
        want = float(token_loss_sum(whole_model.eval(), ids, ids)[0])
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"rows_only": rows_only, "rows": same_rows, "buffers": same_buffers, "loss": [loss, want]}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_reads_only_its_rows_and_holds_the_whole_models_weights(tmp_path, world):
    folder = tmp_path / "qwen2"
    _save_qwen2(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_ranks(_worker, (world, port, str(folder), str(tmp_path)), world)
    for r in range(world):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["rows_only"] and got["rows"] and got["buffers"]
        assert got["loss"][0] == pytest.approx(got["loss"][1], rel=1e-6)


def test_the_builtin_model_is_loaded_whole_then_sharded():
    # No files to read rows from: the whole model first, as before.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model, rows_only = sharding.load_sharded(ModelConfig(), torch.device("cpu"))
        assert not rows_only
        assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    finally:
        dist.destroy_process_group()
