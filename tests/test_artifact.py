"""The artifact format: atomic writes, model checks, SVD compression. No Ray needed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dba_ray import artifact
from dba_ray.config import ModelConfig
from dba_ray.errors import UserError
from dba_ray.model import load_model


def fake_gradient(model, seed=0) -> artifact.GlobalGradient:
    """A GlobalGradient with random tensors shaped like ``model``."""
    gen = torch.Generator().manual_seed(seed)
    mean = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    stats = artifact.Stats(tokens=10, sequences=2, batches=1, loss_sum=5.0, data_fingerprint="0")
    meta = artifact.build_meta(
        mean,
        artifact.parameter_shapes(model),
        stats,
        base_model={"name_or_path": "builtin:tiny-llama", "revision": None},
        data={"path": "x"},
        seq_len=8,
        dtype="float32",
        description="test",
        has_second_moment=False,
    )
    return artifact.GlobalGradient(mean=mean, meta=meta)


def test_roundtrip_and_mismatched_model_is_refused(tmp_path):
    model = load_model(ModelConfig())
    grad = fake_gradient(model)
    uri = str(tmp_path / "g")
    artifact.save(uri, grad)
    back = artifact.load_any(uri, model=model)
    assert all(torch.equal(back.mean[n], grad.mean[n]) for n in grad.mean)
    other = load_model(ModelConfig(builtin_config={"hidden_size": 32, "intermediate_size": 64}))
    with pytest.raises(UserError) as e:
        artifact.load_any(uri, model=other, model_name="my-other-model")
    msg = str(e.value)
    assert "'builtin:tiny-llama'" in msg and "'my-other-model'" in msg
    assert grad.meta["param_fingerprint"] in msg
    assert "model.embed_tokens.weight: [262, 32] vs [262, 64]" in msg


def test_existing_artifact_is_not_overwritten_by_default(tmp_path):
    model = load_model(ModelConfig())
    uri = str(tmp_path / "g")
    artifact.save(uri, fake_gradient(model, seed=0))
    with pytest.raises(UserError, match="already exists"):
        artifact.save(uri, fake_gradient(model, seed=1))
    artifact.save(uri, fake_gradient(model, seed=1), overwrite=True)
    assert torch.equal(
        artifact.load(uri).mean["lm_head.weight"], fake_gradient(model, seed=1).mean["lm_head.weight"]
    )


def test_svd_compression_error_is_reported_truthfully(tmp_path):
    model = load_model(ModelConfig())
    grad = fake_gradient(model)
    meta = artifact.save(str(tmp_path / "svd"), grad, svd_rank=4)
    back = artifact.load(str(tmp_path / "svd"))
    comp = meta["compression"]
    name = "model.layers.0.mlp.up_proj.weight"  # 176 x 64: compressed to rank 4
    err = float((back.mean[name] - grad.mean[name]).norm() / grad.mean[name].norm())
    assert comp["relative_error_per_tensor"][name] == pytest.approx(err, rel=1e-3)
    assert 0 < comp["relative_error"] < 1
    # 1-D tensors stay dense and exact.
    norm_w = "model.layers.0.input_layernorm.weight"
    assert torch.equal(back.mean[norm_w], grad.mean[norm_w])
    # A rank at or above the matrix size keeps it exact.
    meta = artifact.save(str(tmp_path / "full"), grad, svd_rank=10_000)
    assert meta["compression"]["relative_error"] == 0
    full = artifact.load(str(tmp_path / "full"))
    assert torch.equal(full.mean[name], grad.mean[name])


WRITER = r"""
import sys, torch
from dba_ray import artifact
mean = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(64)}
stats = artifact.Stats(tokens=1, sequences=1, batches=1, loss_sum=0.0, data_fingerprint="0")
meta = artifact.build_meta(mean, {n: list(t.shape) for n, t in mean.items()}, stats,
    base_model={"name_or_path": "x"}, data={}, seq_len=1, dtype="float32",
    description="", has_second_moment=False)
print("start", flush=True)
artifact.save(sys.argv[1], artifact.GlobalGradient(mean=mean, meta=meta),
              overwrite=True, max_shard_bytes=4 * 1024**2)
print("done", flush=True)
"""


def _kill_mid_write(uri: str, tmp_path) -> None:
    """Start a real writer process and SIGKILL it once some shards are on disk."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, uri], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    deadline = time.time() + 60
    while time.time() < deadline:
        partial = [
            f for d in tmp_path.iterdir() if d.name.startswith(".g.tmp") for f in d.iterdir()
        ]
        if len(partial) >= 2:
            break
        time.sleep(0.01)
    else:
        pytest.fail("writer produced no partial shards")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_interrupted_write_leaves_nothing_that_loads(tmp_path):
    uri = str(tmp_path / "g")
    _kill_mid_write(uri, tmp_path)
    with pytest.raises(UserError, match="not found|not a complete"):
        artifact.load(uri)
    # Interrupting a replacement keeps the old, complete artifact intact.
    model = load_model(ModelConfig())
    artifact.save(uri, fake_gradient(model))
    _kill_mid_write(uri, tmp_path)
    assert artifact.load_any(uri, model=model).meta["description"] == "test"


def test_incomplete_or_corrupt_directory_is_refused(tmp_path):
    model = load_model(ModelConfig())
    uri = str(tmp_path / "g")
    meta = artifact.save(uri, fake_gradient(model))
    shard = next(iter(meta["files"]))
    with open(os.path.join(uri, shard), "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="corrupt"):
        artifact.load(uri)
    os.remove(os.path.join(uri, "meta.json"))
    with pytest.raises(UserError, match="not a complete"):
        artifact.load(uri)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "meta.json").write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(UserError, match="not a dba-ray global-gradient artifact"):
        artifact.load(str(tmp_path / "h"))
