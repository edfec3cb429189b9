"""What a user sees: `dba-ray` run as a subprocess on a cluster of its own, as from a
fresh shell, on a machine where another Ray instance (this session's) runs too."""

import os
import re
import subprocess
import sys

import yaml
from conftest import make_docs, write_jsonl

from dba_ray import console
from dba_ray.config import ModelConfig
from dba_ray.model import load_model, load_tokenizer


def _dba_ray(args: list[str], cwd) -> str:
    """The whole console (stdout and stderr, interleaved) of ``dba-ray ARGS``."""
    # A user's shell: no address to join, no auth mode chosen (this session's cluster
    # set RAY_AUTH_MODE in this process when it started), none of the quiet switches
    # (tests that call main() in this process set them here).
    drop = {"RAY_ADDRESS", "RAY_AUTH_MODE", *console.QUIET_ENV}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    done = subprocess.run(
        [sys.executable, "-m", "dba_ray", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout
    return done.stdout


def _shape(console: str, out: str) -> list[str]:
    """The console's lines with numbers as # and the output folder as OUT."""
    return [re.sub(r"\d+", "#", line.replace(out, "OUT")) for line in console.splitlines()]


def test_quiet_console_and_verbose(tmp_path):
    # A saved base model: Ray workers load it with from_pretrained, whose progress bars
    # ("Loading weights") are part of what the quiet console leaves out.
    base = tmp_path / "base"
    load_model(ModelConfig()).save_pretrained(base)
    load_tokenizer(ModelConfig()).save_pretrained(base)
    tree = {
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(base)},
        "ray": {"num_cpus": 2},
        "train": {
            "data": {"path": write_jsonl(tmp_path / "dom.jsonl", make_docs(40, seed=1)), "seq_len": 32},
            "batch_size": 4,
            "max_steps": 2,
            "progress_interval_s": 60,  # the final progress line only, whatever the machine's speed
        },
        "eval": {"sets": [
            {"name": "dom", "kind": "domain", "data": {"path": write_jsonl(tmp_path / "de.jsonl", make_docs(4, 2))}},
            {"name": "gen", "kind": "general", "data": {"path": write_jsonl(tmp_path / "ge.jsonl", make_docs(4, 3))}},
        ]},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))

    console = _dba_ray(["train", "cfg.yaml", "--method", "direct"], tmp_path)
    lines = _shape(console, str(tmp_path / "out"))
    # Exactly these lines: Ray's one warning, then ours. No Hugging Face or Ray Data
    # progress bars, no Ray Data plans, no Ray Train INFO lines, no deduplication
    # banner, no PlacementGroupCleaner traceback.
    assert lines[0] == (
        "#-#-# #:#:#,#\tWARNING authentication_token_setup.py:# -- Token authentication is enabled for this "
        "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. For more information, see "
        "https://docs.ray.io/en/latest/ray-security/token-auth.html"
    ), console
    assert lines[1].startswith("#:#:# dba-ray: Ray cluster resources: {"), console
    assert lines[2:] == [
        "#:#:# dba-ray: stage # (direct): # steps of # sequences on # worker(s)",
        "#:#:# dba-ray: train direct: #/# steps (#%), loss #.#",
        "#:#:# dba-ray: stage # (direct) done in #.#s: S_D #.#, S_G #.#, S #.#",
        "direct: model saved to OUT/direct/model",
        "  S_D #.#",
        "  S_G #.#",
        "  S #.#",
    ], console

    # --verbose lets the libraries' own lines through again (an eval: one Ray task, no Train run).
    console = _dba_ray(["--verbose", "eval", "cfg.yaml"], tmp_path)
    assert "Loading weights" in console and "Execution plan of Dataset" in console, console
    assert "Started a local Ray instance" in console, console
