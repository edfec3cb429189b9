"""The CLI in-process on the session's Ray cluster: the happy path and user errors."""

import json

import pytest
import yaml
from conftest import make_docs, write_jsonl

from dba_ray import artifact
from dba_ray.cli import main
from dba_ray.progress import progress_line

pytestmark = pytest.mark.usefixtures("ray_cluster")


def config_file(tmp_path, data_path, **stage1):
    tree = {
        "output_dir": str(tmp_path / "out"),
        "stage1": {
            "data": {"path": data_path, "seq_len": 32},
            "batch_size": 4,
            "progress_interval_s": 1,
            **stage1,
        },
    }
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(tree))
    return str(f)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dba-ray: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_global_gradient_then_inspect(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="dba_ray")
    data = write_jsonl(tmp_path / "g.jsonl", make_docs(40))
    cfg = config_file(tmp_path, data, second_moment=True, description="cli test")
    # bf16 weights: the fp32 accumulation path, and max_tokens as the docs write it.
    rc = main(["global-gradient", cfg, "--set", "model.dtype=bfloat16", "--set", "stage1.max_tokens=3.2e2"])
    assert rc == 0
    out_dir = tmp_path / "out" / "global_gradient"
    meta = artifact.read_meta(str(out_dir))
    assert meta["sequences"] == 10 and meta["dtype"] == "bfloat16"
    assert any("stage1: " in r.message and "(100%)" in r.message for r in caplog.records)
    capsys.readouterr()

    assert main(["inspect", str(out_dir), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "builtin:tiny-llama" in out and "cli test" in out
    assert f"{meta['tokens']:,} tokens, 10 sequences of 32" in out
    assert "all sha256 checksums match" in out and "model.embed_tokens.weight" in out
    assert main(["inspect", str(out_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["param_fingerprint"] == meta["param_fingerprint"]

    # A second run refuses to replace the artifact unless told to.
    assert main(["global-gradient", cfg]) == 2
    assert "already exists" in error_line(capsys)


def test_user_errors_are_one_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad" / "b.jsonl", [{"text": "fine"}, {"txt": "oops"}])
    assert main(["global-gradient", config_file(tmp_path, bad)]) == 2
    assert f"malformed record at {bad}:2: field 'text' missing" in error_line(capsys)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("")
    assert main(["global-gradient", config_file(tmp_path, str(tmp_path / "empty"))]) == 2
    assert f"stage1.data.path {tmp_path / 'empty'} holds no non-empty data files" in error_line(capsys)

    assert main(["global-gradient", config_file(tmp_path, str(tmp_path / "missing.jsonl"))]) == 2
    assert f"stage1.data.path {tmp_path / 'missing.jsonl'} does not exist" in error_line(capsys)

    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a complete global-gradient artifact" in error_line(capsys)


def test_progress_line():
    assert progress_line("stage1", 1.2e6, 2e6, 1e4) == ("stage1: 1.20M/2.00M tokens (60%), 10.00k tokens/s, ETA 1m20s")
    assert progress_line("stage1", 500, None, 20.0) == "stage1: 500 tokens, 20 tokens/s"
    assert progress_line("stage1", 500, 1000, None) == "stage1: 500/1.00k tokens (50%)"
