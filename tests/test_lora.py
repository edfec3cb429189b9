"""LoRA under gradient checkpointing (no Ray): the adapters must get their gradients."""

import torch

from dba_ray import parallel
from dba_ray.config import Config
from dba_ray.trainer import build_model


def adapter_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    cfg = Config.model_validate({"train": {"gradient_checkpointing": checkpointing, "lora": {"r": 4}}})
    model, _ = build_model(cfg, "lora", parallel.layout("ddp", 0, 1), torch.device("cpu"))
    # B starts at zero, so A's gradient would be zero too: give B a value.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(len(n)))
    x = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_lora_adapters_get_gradients_under_gradient_checkpointing():
    plain, ckpt = adapter_grads(False), adapter_grads(True)
    assert plain and all("lora_" in n for n in plain)
    # Before the fix, on transformers 4.56 (reentrant checkpointing by default, frozen
    # inputs) the backward pass failed: no adapter was reached.
    assert all(ckpt[n] is not None for n in plain), [n for n in plain if ckpt[n] is None]
    for n, g in plain.items():
        assert float(g.abs().sum()) > 0
        torch.testing.assert_close(ckpt[n], g, rtol=1e-5, atol=1e-7)
