"""Bad input, as a table: each case ends the command with one line on stderr naming the
thing and what to do, exit code 2, no traceback, and nothing half-written that a later
run would load. Cases that fail before Ray starts run in-process, without a cluster."""

import json
import shutil

import pytest
import yaml

from conftest import make_docs, write_jsonl
from dba_ray import artifact
from dba_ray.cli import main


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dba-ray: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_artifact(path, data_path: str) -> dict:
    """A real ĝ_G artifact of the builtin model, as Stage 1 would record it for a config
    whose general data is ``data_path`` (no Ray: the tensors are zeros)."""
    from dba_ray.config import Config
    from dba_ray.data import describe_source
    from dba_ray.global_gradient import stage1_settings
    from dba_ray.model import load_empty_model, model_source

    import torch

    cfg = Config.model_validate({"stage1": {"data": {"path": data_path, "seq_len": 32}}})
    shapes = artifact.parameter_shapes(load_empty_model(cfg.model))
    mean = {n: torch.zeros(s) for n, s in shapes.items()}
    stats = artifact.Stats(tokens=1, sequences=1, batches=1, loss_sum=0.0, data_fingerprint="0",
                           extra={"stage1_settings": stage1_settings(cfg.stage1)})
    meta = artifact.build_meta(
        mean, shapes, stats, base_model=model_source(cfg.model), data=describe_source(cfg.stage1.data),
        seq_len=32, dtype="float32", description="", has_second_moment=False,
    )
    artifact.save(str(path), artifact.GlobalGradient(mean=mean, meta=meta))
    return artifact.read_meta(str(path))


def pipeline_tree(tmp_path) -> dict:
    """A `run` / `compare` config on tiny files; nothing in it is wrong."""
    gen = write_jsonl(tmp_path / "gen.jsonl", make_docs(30, seed=0))
    dom = write_jsonl(tmp_path / "dom.jsonl", make_docs(30, seed=1))
    ev = write_jsonl(tmp_path / "ev.jsonl", make_docs(4, seed=2))
    return {
        "output_dir": str(tmp_path / "out"),
        "stage1": {"data": {"path": gen, "seq_len": 32}, "output": str(tmp_path / "shared_gg")},
        "train": {"data": {"path": dom, "seq_len": 32}, "max_steps": 2, "batch_size": 2},
        "eval": {"sets": [{"name": "ev", "kind": "general", "data": {"path": ev, "seq_len": 32}}]},
    }


def write_config(tmp_path, tree, name="cfg.yaml") -> str:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(tree))
    return str(f)


@pytest.mark.parametrize("command", ["run", "compare"])
@pytest.mark.parametrize("pretrain", [False, True])
def test_another_configs_global_gradient_is_not_replaced(tmp_path, capsys, command, pretrain):
    """Two configs pointing at one stage1.output: the second must not destroy the first
    one's ĝ_G (it used to, silently). Refused before pretraining or Stage 1 starts."""
    tree = pipeline_tree(tmp_path)
    other = write_jsonl(tmp_path / "other_gen.jsonl", make_docs(30, seed=5))
    made = write_artifact(tmp_path / "shared_gg", other)
    if pretrain:
        tree["pretrain"] = {"data": {"path": tree["stage1"]["data"]["path"], "seq_len": 32}, "max_steps": 2}
    assert main([command, write_config(tmp_path, tree)]) == 2
    line = error_line(capsys)
    what = "base model" if pretrain else "general data"
    assert f"the global gradient at {tmp_path / 'shared_gg'} was made with another {what}" in line
    assert "stage1.overwrite: true" in line
    assert artifact.read_meta(str(tmp_path / "shared_gg")) == made
    assert not (tmp_path / "out").exists()  # nothing started: no pretraining, no Stage 1
