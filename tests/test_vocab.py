"""The vocabulary warning: a `dba` run with the paper's boost names the input-embedding
rows ĝ_G moves that its domain data never touches (dba_ray/vocab.py)."""

import random

import numpy as np
import pytest
import yaml
from conftest import console_shape, dba_ray_console, save_builtin_base, write_jsonl
from safetensors import safe_open

from dba_ray.config import ModelConfig, load_config
from dba_ray.data.tokenize import IGNORE
from dba_ray.global_gradient import run_global_gradient
from dba_ray.tokenizer import load_tokenizer
from dba_ray.vocab import QUIET_BELOW, coverage_warning, general_rows, touched_ids


def test_touched_ids_are_the_positions_that_feed_a_loss():
    ids = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    # Row 0: text then padding (7 is the last trained target, so 6 feeds it and 7 does
    # not); row 1: a prompt (9, 10) whose response (11, 12) is trained, then padding.
    labels = np.array([[5, 6, 7, IGNORE, IGNORE, IGNORE], [IGNORE, IGNORE, 11, 12, IGNORE, IGNORE]])
    assert touched_ids(ids, labels).tolist() == [5, 6, 9, 10, 11]


def _texts(alphabet: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(20, 60))) for _ in range(n)]


@pytest.mark.usefixtures("ray_cluster")
def test_warning_states_the_untouched_rows_the_boost_moves(tmp_path):
    # General text over 9 characters; one domain uses 5 of them, the other all 9.
    general, narrow, covered = _texts("abcdefgh ", 60, 0), _texts("abcd ", 40, 1), _texts("abcdefgh ", 40, 2)
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"text": t} for t in general])
    base = save_builtin_base(tmp_path / "base")
    grad_dir = tmp_path / "global_gradient"

    def config(name: str, texts: list[str]) -> str:
        tree = {
            "output_dir": str(tmp_path / name),
            "model": {"name_or_path": base},
            "ray": {"num_cpus": 2},
            "stage1": {"data": {"path": gen, "seq_len": 32}, "batch_size": 8, "output": str(grad_dir)},
            "train": {
                "data": {"path": write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in texts]), "seq_len": 32},
                "batch_size": 4,
                "max_steps": 2,
                "progress_interval_s": 60,
                "dba": {"boost": 0.5},  # γ_0 = 0.25: no saturation warning beside the one tested
            },
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(tree))
        return f"{name}.yaml"

    # ĝ_G in this process, on the session's cluster (a CLI run would cost a cluster of
    # its own); the training whose console is under test runs as a user runs it.
    run_global_gradient(load_config(str(tmp_path / config("narrow", narrow))))
    console = dba_ray_console(["train", "narrow.yaml", "--method", "dba"], tmp_path)

    # Counted here on their own: ĝ_G's nonzero embedding rows, and every token of the
    # domain records (packed text: EOS between records).
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
    (shaped,) = console_shape(warning, str(tmp_path))
    lines = console_shape(console, str(tmp_path / "narrow"))
    assert lines[1].startswith("#:#:# dba-ray: Ray cluster resources: {"), console
    # lines[0] is Ray's token-authentication warning (tests/test_console.py).
    assert lines[2:] == [
        "#:#:# dba-ray: " + shaped,
        "#:#:# dba-ray: stage # (dba): # steps of # sequences on # worker(s)",
        "#:#:# dba-ray: train dba: #/# steps (#%), loss #.#",
        "#:#:# dba-ray: stage # (dba) done in #.#s: no eval sets",
        "dba: model saved to OUT/dba/model",
        "  S_D nan",
        "  S_G nan",
        "  S nan",
    ], console
    assert any(line.endswith(f"dba-ray: {warning}") for line in console.splitlines())

    # A domain that uses every row ĝ_G moves gets no line. The check the run printed,
    # on the same ĝ_G, with the covered domain's tokens instead (a second CLI run would
    # cost a Ray cluster and a Train run for one line's absence).
    size = len(tok)
    rows = general_rows(str(grad_dir), "model.embed_tokens.weight", size)
    assert set(np.flatnonzero(rows).tolist()) == moved
    covered_ids = np.array(
        [tok.eos_token_id, *(i for t in covered for i in tok(t, add_special_tokens=False)["input_ids"])]
    )
    assert coverage_warning("dba", rows, size, covered_ids) is None
    assert coverage_warning("dba", rows, size, np.array(sorted(domain))) == warning


def test_warning_only_from_the_quiet_threshold_on():
    # 40 rows moved; the domain leaves QUIET_BELOW of them untouched (a line), or one fewer (none).
    moved = np.zeros(100, dtype=bool)
    moved[:40] = True
    at = round(QUIET_BELOW * 40)
    line = coverage_warning("dba", moved, 100, np.arange(at, 100))
    assert line is not None and line.startswith(f"dba: {at} of the 40 input-embedding rows ĝ_G moves ({at / 40:.1%})")
    assert coverage_warning("dba", moved, 100, np.arange(at - 1, 100)) is None
    # An SVD-compressed ĝ_G (moved None): every row of the vocabulary counts as moved.
    assert coverage_warning("dba", None, 100, np.arange(50)).startswith("dba: 50 of the 100 ")
