"""What a user sees: `dba-ray` run as a subprocess on a cluster of its own, as from a
fresh shell, on a machine where another Ray instance (this session's) runs too. The run
is a `dba` run with the paper's boost on a domain that uses few of the tokens its
general text does, so its console holds the vocabulary warning (dba_ray/vocab.py)."""

import random

import numpy as np
import yaml
from conftest import console_shape, dba_ray_console, save_builtin_base, write_jsonl
from safetensors import safe_open

from dba_ray.config import ModelConfig, load_config
from dba_ray.global_gradient import run_global_gradient
from dba_ray.tokenizer import load_tokenizer
from dba_ray.vocab import coverage_warning, general_rows


def _texts(alphabet: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(20, 60))) for _ in range(n)]


def test_quiet_console_vocabulary_warning_and_verbose(tmp_path, ray_cluster):
    # General text over 9 characters; the domain uses 5 of them (a second one, all 9).
    general, narrow, covered = _texts("abcdefgh ", 60, 0), _texts("abcd ", 40, 1), _texts("abcdefgh ", 40, 2)
    # A saved base model: Ray workers load it with from_pretrained, whose progress bars
    # ("Loading weights") are part of what the quiet console leaves out.
    base = save_builtin_base(tmp_path / "base")
    grad_dir = tmp_path / "global_gradient"
    tree = {
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": base},
        "ray": {"num_cpus": 2},
        "stage1": {"data": {"path": write_jsonl(tmp_path / "gen.jsonl", [{"text": t} for t in general]),
                            "seq_len": 32}, "batch_size": 8, "output": str(grad_dir)},
        "train": {
            "data": {"path": write_jsonl(tmp_path / "dom.jsonl", [{"text": t} for t in narrow]), "seq_len": 32},
            "batch_size": 4,
            "max_steps": 2,
            "progress_interval_s": 60,  # the final progress line only, whatever the machine's speed
            "dba": {"boost": 0.5},  # γ_0 = 0.25: no saturation warning beside the vocabulary's
        },
        "eval": {"sets": [
            {"name": "dom", "kind": "domain", "data": {"path": write_jsonl(tmp_path / "de.jsonl", [{"text": narrow[0]}])}},
            {"name": "gen", "kind": "general", "data": {"path": write_jsonl(tmp_path / "ge.jsonl", [{"text": general[0]}])}},
        ]},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    # ĝ_G is made here, on this session's cluster: `dba-ray train` reads it.
    run_global_gradient(load_config(str(tmp_path / "cfg.yaml")))

    console = dba_ray_console(["train", "cfg.yaml", "--method", "dba"], tmp_path)

    # The warning's numbers, counted here on their own: ĝ_G's nonzero embedding rows, and
    # every token of the domain records (packed text: EOS between records).
    (mean_file,) = grad_dir.glob("mean_gradient-*.safetensors")
    with safe_open(str(mean_file), "pt") as f:
        moved = set(np.flatnonzero(f.get_tensor("model.embed_tokens.weight").abs().sum(dim=1)).tolist())
    tok = load_tokenizer(ModelConfig())
    domain = {tok.eos_token_id} | {i for t in narrow for i in tok(t, add_special_tokens=False)["input_ids"]}
    untouched = moved - domain
    assert len(moved) == 10 and sorted(tok.convert_ids_to_tokens(sorted(untouched))) == ["e", "f", "g", "h"]
    warning = (
        f"dba: {len(untouched)} of the {len(moved)} input-embedding rows ĝ_G moves "
        f"({len(untouched) / len(moved):.1%}) belong to tokens the domain data never uses; under "
        "boost_mode: gradient AdamW steps each of them by a full lr along ĝ_G every step, which costs "
        "general ability: consider dba.boost_mode: masked or update (README, The vocabulary warning)"
    )
    assert any(line.endswith(f"dba-ray: {warning}") for line in console.splitlines()), console

    # Exactly these lines: Ray's one warning, then ours. No Hugging Face or Ray Data
    # progress bars, no Ray Data plans, no Ray Train INFO lines, no deduplication
    # banner, no PlacementGroupCleaner traceback. (Less absl's mutex debugging, which a
    # Ray worker prints now and then under load.)
    lines = [x for x in console_shape(console, str(tmp_path / "out")) if "[mutex.cc : #] RAW:" not in x]
    assert lines[0] == (
        "#-#-# #:#:#,#\tWARNING authentication_token_setup.py:# -- Token authentication is enabled for this "
        "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. For more information, see "
        "https://docs.ray.io/en/latest/ray-security/token-auth.html"
    ), console
    assert lines[1].startswith("#:#:# dba-ray: Ray cluster resources: {"), console
    (shaped,) = console_shape(warning, str(tmp_path))
    assert lines[2:] == [
        "#:#:# dba-ray: " + shaped,
        "#:#:# dba-ray: stage # (dba): # steps of # sequences on # worker(s)",
        "#:#:# dba-ray: train dba: #/# steps (#%), loss #.#",
        "#:#:# dba-ray: stage # (dba) done in #.#s: S_D #.#, S_G #.#, S #.#",
        "dba: model saved to OUT/dba/model",
        "  S_D #.#",
        "  S_G #.#",
        "  S #.#",
    ], console

    # A domain that uses every row ĝ_G moves gets no line: the check the run printed, on
    # the same ĝ_G, with that domain's tokens instead (a second run would cost a Ray
    # cluster and a Train run for one line's absence).
    size = len(tok)
    rows = general_rows(str(grad_dir), "model.embed_tokens.weight", size)
    assert set(np.flatnonzero(rows).tolist()) == moved
    covered_ids = np.array(
        [tok.eos_token_id, *(i for t in covered for i in tok(t, add_special_tokens=False)["input_ids"])]
    )
    assert coverage_warning("dba", rows, size, covered_ids) is None
    assert coverage_warning("dba", rows, size, np.array(sorted(domain))) == warning

    # --verbose lets the libraries' own lines through again (an eval: one Ray task, no Train run).
    console = dba_ray_console(["--verbose", "eval", "cfg.yaml"], tmp_path)
    assert "Loading weights" in console and "Execution plan of Dataset" in console, console
    assert "Started a local Ray instance" in console, console
