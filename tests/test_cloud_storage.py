"""Every artifact on a real S3 API: the moto server on 127.0.0.1 (conftest's ``s3_env``),
reached through pyarrow exactly as a cloud bucket would be, by the driver and by Ray's
workers. Nothing here runs against a mocked filesystem."""

import json
import os
import posixpath
import uuid

import pyarrow.fs as pafs
import pytest
import torch
import yaml
from conftest import fail_once_at_step, make_docs, write_jsonl
from safetensors.torch import load as st_load
from test_artifact import fake_gradient

from dba_ray import artifact, storage
from dba_ray.checkpoint import shard_file
from dba_ray.cli import main
from dba_ray.config import ModelConfig
from dba_ray.errors import UserError
from dba_ray.model import load_model
from dba_ray.tokenizer import load_tokenizer


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"dba-{uuid.uuid4().hex[:8]}"
    # (A bare S3FileSystem() ignores AWS_ENDPOINT_URL; FileSystem.from_uri honours it.)
    fs = pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    fs.create_dir(name)
    return f"s3://{name}"


def names_under(uri: str) -> list[str]:
    return [posixpath.relpath(u, uri) for u, _ in storage.list_files(uri)]


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.usefixtures("ray_cluster")
def test_dba_ray_run_keeps_every_artifact_in_s3(tmp_path, monkeypatch, bucket):
    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    gen = write_jsonl(tmp_path / "data" / "gen.jsonl", make_docs(30, seed=0))
    dom = write_jsonl(tmp_path / "data" / "dom.jsonl", [{"text": "def f(x):\n    return x + 1"}] * 24)
    out = f"{bucket}/runs/tiny"
    tree = {
        "output_dir": out,
        "methods": ["dba"],
        "stage1": {"data": {"path": gen, "seq_len": 32}, "batch_size": 8},
        "train": {
            "data": {"path": dom, "seq_len": 32},
            "batch_size": 4,
            "max_steps": 4,
            "checkpoint_every": 2,
            "schedule": {"lr": 3e-3},
            "max_failures": 1,
            "progress_interval_s": 5,
        },
        "eval": {
            "sets": [
                {"name": "dom", "kind": "domain", "data": {"path": dom, "seq_len": 32}},
                {"name": "gen", "kind": "general", "data": {"path": gen, "seq_len": 32}},
            ],
            "max_sequences": 8,
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    # A worker dies after step 3: the run must resume from the checkpoint it reads back
    # from S3 (the marker of the injected failure lives there too).
    with fail_once_at_step(3):
        assert main(["run", "run.yaml"]) == 0

    report = json.loads(storage.read_bytes(f"{out}/report.json"))
    assert b"| dba |" in storage.read_bytes(f"{out}/report.md")
    dba = report["results"]["dba"]
    assert dba["steps"] == 4 and dba["model_dir"] == f"{out}/dba/model"
    assert storage.exists(f"{out}/dba/failed_once")

    # ĝ_G: complete, every file matching its sha256, made for the base model.
    base = load_model(ModelConfig())
    grad = artifact.load(f"{out}/global_gradient", verify=True)
    grad.check_model(base)
    assert grad.meta["tokens"] > 0

    # Checkpoints under Ray Train's storage path in the bucket; the one of step 4 holds
    # exactly the weights of the final model, saved with save_pretrained beside them.
    files = names_under(f"{out}/ray_train")
    ckpts = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith("/state.json")})
    assert ckpts and all(c.startswith("train-dba-") for c in ckpts)
    steps = [json.loads(storage.read_bytes(f"{out}/ray_train/{c}/state.json"))["step"] for c in ckpts]
    assert 4 in steps
    final_ckpt = f"{out}/ray_train/{ckpts[steps.index(4)]}/{shard_file(0, 1)}"  # DDP: one shard
    ckpt_weights = st_load(storage.read_bytes(final_ckpt))
    tuned = load_model(ModelConfig(name_or_path=dba["model_dir"]))
    assert load_tokenizer(ModelConfig(name_or_path=dba["model_dir"])).eos_token == "<|eos|>"
    for name, t in tuned.named_parameters():
        assert torch.equal(t, ckpt_weights[f"model::{name}"]), name
    assert any(not torch.equal(t, base.state_dict()[n]) for n, t in tuned.state_dict().items())

    # `dba-ray eval` loads the model from S3 in a Ray task and writes eval.json there.
    assert main(["eval", "run.yaml", "--set", f"eval.models.tuned={dba['model_dir']}"]) == 0
    scored = json.loads(storage.read_bytes(f"{out}/eval.json"))
    assert scored["results"]["tuned"]["eval"]["dom"]["nll"] == pytest.approx(dba["eval"]["dom"]["nll"], rel=1e-4)
    assert storage.exists(f"{out}/eval.md")
    assert sorted(os.listdir(tmp_path)) == ["data", "run.yaml"]


def test_interrupted_writes_never_load_as_complete(bucket):
    model = load_model(ModelConfig())

    # ĝ_G: a save that fails after every tensor file is uploaded, over a complete
    # artifact, leaves one without meta.json, which is refused (and Stage 1 recomputes).
    gg = f"{bucket}/gg"
    artifact.save(gg, fake_gradient(model, seed=0))
    broken = fake_gradient(model, seed=1)
    broken.meta["not_json"] = {1, 2}  # json.dumps raises just before the marker is written
    with pytest.raises(TypeError):
        artifact.save(gg, broken, overwrite=True)
    assert any(n.startswith("mean_gradient-") for n in names_under(gg))
    assert not storage.exists(f"{gg}/meta.json")
    with pytest.raises(UserError, match="not a complete global-gradient artifact"):
        artifact.load(gg)

    # A file cut short after meta.json was written is caught by its recorded size.
    artifact.save(gg, fake_gradient(model, seed=2), overwrite=True)
    shard = next(n for n in names_under(gg) if n.startswith("mean_gradient-"))
    blob = storage.read_bytes(f"{gg}/{shard}")
    storage.write_bytes_atomic(f"{gg}/{shard}", blob[: len(blob) // 2])
    with pytest.raises(UserError, match="is corrupt"):
        artifact.load(gg)

    # A model directory: save_pretrained goes to a local directory, then is uploaded
    # with config.json last.
    uri = f"{bucket}/model"
    with storage.staged_directory(uri, overwrite=False, marker="config.json") as d:
        model.save_pretrained(d)
    first = state_of(load_model(ModelConfig(name_or_path=uri)))
    assert all(torch.equal(first[n], t) for n, t in model.state_dict().items())

    # Failing before the upload sends nothing: the previous model stays whole.
    other = load_model(ModelConfig(seed=1))
    with (
        pytest.raises(RuntimeError, match="crash"),
        storage.staged_directory(uri, overwrite=True, marker="config.json") as d,
    ):
        other.save_pretrained(d)
        raise RuntimeError("crash while saving")
    again = load_model(ModelConfig(name_or_path=uri))
    assert all(torch.equal(first[n], t) for n, t in again.state_dict().items())

    # Failing in the middle of the upload (a file that cannot be read, after the
    # weights were sent) leaves files but no config.json: never loaded, never cached.
    with (
        pytest.raises(FileNotFoundError),
        storage.staged_directory(uri, overwrite=True, marker="config.json") as d,
    ):
        other.save_pretrained(d)
        os.symlink(os.path.join(d, "gone"), os.path.join(d, "notes.txt"))
    left = names_under(uri)
    assert "model.safetensors" in left and "config.json" not in left
    with pytest.raises(UserError, match="no config.json"):
        load_model(ModelConfig(name_or_path=uri))
    with pytest.raises(UserError, match="no config.json"):
        load_tokenizer(ModelConfig(name_or_path=uri, tokenizer=uri))
