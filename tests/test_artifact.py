"""The artifact format: atomic writes, model checks, SVD compression. No Ray needed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import spawn_ranks

from dba_ray import artifact
from dba_ray.config import ModelConfig
from dba_ray.errors import UserError
from dba_ray.model import load_empty_model, load_model


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
    assert torch.equal(artifact.load(uri).mean["lm_head.weight"], fake_gradient(model, seed=1).mean["lm_head.weight"])


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
    # Rows of a compressed matrix (an FSDP rank's): its rows of U·S times the whole V^T.
    part = artifact.load(str(tmp_path / "svd"), rows={name: (3, 70), norm_w: (5, 9)})
    torch.testing.assert_close(part.mean[name], back.mean[name][3:70])
    assert torch.equal(part.mean[norm_w], grad.mean[norm_w][5:9])


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
        partial = [f for d in tmp_path.iterdir() if d.name.startswith(".g.tmp") for f in d.iterdir()]
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


# Odd sizes: FSDP's rows split unevenly over the ranks, as a real model's do.
SHARDED = {"hidden_size": 384, "intermediate_size": 1001, "num_hidden_layers": 4}


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _fsdp_rank_reads_its_rows(rank: int, world: int, port: int, uri: str, out: dict) -> None:
    """One FSDP rank (gloo, the model sharded on the meta device, so that the only real
    memory is the artifact's): the peak growth of its resident memory while reading."""
    import torch.distributed as dist

    from dba_ray.sharding import local_rows, shard_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = local_rows(shard_model(load_empty_model(ModelConfig(builtin_config=SHARDED))))
    before = _memory_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    grad = artifact.load(uri, rows=rows)
    # DBA reads every value it keeps (‖ĝ_G‖, mean(v_G)): fault every page in.
    kept = [t for part in (grad.mean, grad.second_moment) for t in part.values()]
    sum(float(t.sum()) for t in kept)
    peak = (_memory_kib("VmHWM") - before) * 1024
    whole = artifact.load(uri)
    same = all(
        torch.equal(part[n], full[n][a:b])
        for part, full in ((grad.mean, whole.mean), (grad.second_moment, whole.second_moment))
        for n, (a, b) in rows.items()
    )
    out[rank] = {
        "peak": peak,
        "kept": sum(t.numel() * t.element_size() for t in kept),
        "same": same,
        "sharded": len(rows) == len(whole.mean),
    }
    dist.destroy_process_group()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_fsdp_rank_reads_about_one_world_th_of_the_artifact(tmp_path):
    import socket

    import torch.multiprocessing as mp

    model = load_model(ModelConfig(builtin_config=SHARDED))
    grad = fake_gradient(model)
    grad.second_moment = {n: t.square() for n, t in grad.mean.items()}
    uri = str(tmp_path / "g")
    size = sum(info["bytes"] for info in artifact.save(uri, grad)["files"].values())  # 2 × 33 MB
    del model, grad
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world, out = 2, mp.Manager().dict()
    spawn_ranks(_fsdp_rank_reads_its_rows, (world, port, uri, out), world)
    for rank in range(world):
        r = out[rank]
        assert r["same"] and r["sharded"]
        assert r["kept"] == pytest.approx(size / world, rel=0.05)
        # Reading the whole file (let alone into a byte string first, then a copy) peaks
        # at 1× the artifact or more: a rank's share is 1/world, plus a little slack.
        assert 0.8 / world < r["peak"] / size < 1.25 / world, (rank, r["peak"] / size)
