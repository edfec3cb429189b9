"""The DBA update outside Ray: the bare-loop and Hugging Face Trainer examples run."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from dba_ray import artifact
from dba_ray.config import ModelConfig
from dba_ray.dba import gamma_at
from dba_ray.model import load_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def global_gradient(tmp_path_factory):
    """A real ĝ_G of the builtin model: the mean gradient of a few general sentences."""
    from dba_ray.model import byte_tokenizer

    model = load_model(ModelConfig())
    tok = byte_tokenizer()
    texts = ["The cat sat on the mat.", "Rivers flow to the sea.", "Bread is made from flour."]
    batch = tok(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(input_ids=batch["input_ids"], labels=labels).loss.backward()
    mean = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = artifact.Stats(tokens=1, sequences=3, batches=1, loss_sum=0.0, data_fingerprint="0")
    meta = artifact.build_meta(
        mean, artifact.parameter_shapes(model), stats, base_model={"name_or_path": "builtin:tiny-llama"},
        data={}, seq_len=0, dtype="float32", description="", has_second_moment=False,
    )
    path = str(tmp_path_factory.mktemp("gg") / "artifact")
    artifact.save(path, artifact.GlobalGradient(mean=mean, meta=meta))
    return path


def run_example(name, argv):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return runpy.run_path(str(EXAMPLES / name))["main"](argv)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_bare_loop(global_gradient):
    log = run_example("bare_loop.py", [global_gradient, "--steps", "10"])
    assert [round(s["gamma"], 6) for s in log] == [round(gamma_at(t, 10, 20, 1.0), 6) for t in range(10)]
    assert log[-1]["loss"] < log[0]["loss"]
    assert any(s["c"] > 1 for s in log)  # DC acted once g_D and ĝ_G were blended


def test_hf_trainer(global_gradient, tmp_path):
    trainer, stats = run_example("hf_trainer.py", [global_gradient, "--steps", "6", "--out", str(tmp_path)])
    assert len(stats) == 6
    assert [round(s["gamma"], 6) for s in stats] == [round(gamma_at(t, 6, 12, 1.0), 6) for t in range(6)]
    base = load_model(ModelConfig())
    moved = sum(float((a - b).abs().sum()) for a, b in zip(trainer.model.parameters(), base.parameters()))
    assert moved > 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
