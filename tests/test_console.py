"""What a user sees: `dba-ray` run as a subprocess on a cluster of its own, as from a
fresh shell, on a machine where another Ray instance (this session's) runs too."""

import yaml
from conftest import AUTH_WARNING, console_shape, dba_ray_console, make_docs, save_builtin_base, write_jsonl


def test_quiet_console_and_verbose(tmp_path):
    # A saved base model: Ray workers load it with from_pretrained, whose progress bars
    # ("Loading weights") are part of what the quiet console leaves out.
    base = save_builtin_base(tmp_path / "base")
    tree = {
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": base},
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

    console = dba_ray_console(["train", "cfg.yaml", "--method", "direct"], tmp_path)
    lines = console_shape(console, str(tmp_path / "out"))
    # Exactly these lines: Ray's one warning, then ours. No Hugging Face or Ray Data
    # progress bars, no Ray Data plans, no Ray Train INFO lines, no deduplication
    # banner, no PlacementGroupCleaner traceback.
    assert lines[0] == AUTH_WARNING, console
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
    console = dba_ray_console(["--verbose", "eval", "cfg.yaml"], tmp_path)
    assert "Loading weights" in console and "Execution plan of Dataset" in console, console
    assert "Started a local Ray instance" in console, console
