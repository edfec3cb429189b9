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
    from dba_ray.tokenizer import byte_tokenizer

    model = load_model(ModelConfig())
    tok = byte_tokenizer()
    texts = ["The cat sat on the mat.", "Rivers flow to the sea.", "Bread is made from flour."]
    batch = tok(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(input_ids=batch["input_ids"], labels=labels).loss.backward()
    mean = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = artifact.Stats(tokens=1, sequences=3, batches=1, loss_sum=0.0, data_fingerprint="0")
    meta = artifact.build_meta(
        mean,
        artifact.parameter_shapes(model),
        stats,
        base_model={"name_or_path": "builtin:tiny-llama"},
        data={},
        seq_len=0,
        dtype="float32",
        description="",
        has_second_moment=False,
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
    # The Trainer's weights are a plain loop's that steps at AL's lr × c_t: a schedule
    # the Trainer did not follow or a c_t it did not apply ends elsewhere.
    ref = bare_reference(global_gradient, steps=6)
    got = dict(trainer.model.named_parameters())
    num = sum(float((got[n].detach() - p).pow(2).sum()) for n, p in ref.items())
    assert (num / sum(float(p.pow(2).sum()) for p in ref.values())) ** 0.5 < 1e-5
    assert any(s["c"] > 1.01 for s in stats)  # c_t mattered


def bare_reference(global_gradient, steps):
    """hf_trainer.py's run as a bare loop: same model, data, AdamW, clipping, DBA, AL."""
    from dba_ray.config import DBAConfig, ScheduleConfig
    from dba_ray.dba import DBA, lr_at
    from dba_ray.tokenizer import byte_tokenizer

    texts = runpy.run_path(str(EXAMPLES / "hf_trainer.py"))["TEXTS"]
    enc = byte_tokenizer()(texts, padding="max_length", max_length=96, truncation=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model = load_model(ModelConfig())
    sched = ScheduleConfig(lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=sched.lr)
    dba = DBA(model.named_parameters(), artifact.load(global_gradient).mean, steps, DBAConfig(boost=2 * steps))
    for t in range(steps):
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        c = dba.apply(t).c
        for g in opt.param_groups:
            g["lr"] = lr_at(t, steps, sched) * c
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}
