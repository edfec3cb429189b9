"""The third protocol's harness rules (benchmarks/quality: data3, base3, grid3), as
PROTOCOL3.md writes them: the corpus split and caps, the flatness check, the choice's
tie order, grid edges and extensions. Plain functions: no Ray, no models."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "quality"))
import base3  # noqa: E402
import data3  # noqa: E402
import grid3  # noqa: E402
from protocol import Candidate  # noqa: E402


def test_cut_ends_records_at_line_breaks_and_keeps_the_text():
    lines = [f"line {i} " + "x" * (i * 37 % 300) for i in range(200)]
    text = "\n".join(lines)
    pieces = data3.cut(text)
    assert all(len(p) <= 2048 for p in pieces) and len(pieces) > 5
    assert "\n".join(pieces) == text  # every cut falls on a line break here
    long_line = ("word " * 1000).strip()  # 4,999 characters, no line break
    cut = data3.cut(long_line)
    assert [len(p) for p in cut] == [2044, 2044, 909] and " ".join(cut) == long_line


def test_capped_sets_share_one_budget_and_keep_leading_records():
    short = data3.Doc("enc", "a", "\n".join(["s" * 1000] * 3))  # records of 2,001 and 1,000
    long1 = data3.Doc("enc", "b", "\n".join(["l" * 2000] * 100))
    long2 = data3.Doc("enc", "c", "\n".join(["m" * 2000] * 100))
    records = data3.capped([short, long1, long2], cap=50_000)
    chars = {d: sum(len(r["text"]) for r in records if r["doc"] == d) for d in "abc"}
    assert chars["a"] == 3_001  # shorter than the budget: all of it
    assert chars["b"] == chars["c"] == 22_000  # equal shares of what is left, whole records
    assert sum(chars.values()) <= 50_000
    assert [r["text"] for r in records if r["doc"] == "b"] == data3.cut(long1.text)[:11]  # leading records


def test_split_by_document_hash_with_minimums_and_caps():
    docs = [data3.Doc("books", f"gutenberg:{i}", "w" * 60_000) for i in range(10)]
    parts = data3.split("books", docs)
    ordered = sorted(docs, key=lambda d: d.key)
    assert parts["test"] == ordered[:3]  # 3 documents hold 180,000 >= 150,000 characters
    assert parts["validation"] == ordered[3:5]  # 2 documents, 120,000 >= 75,000
    assert parts["train"] == ordered[5:]
    assert data3.split("math", docs)["train"] == []  # unseen: the rest goes unused
    code = [data3.Doc("code", f"code:{i}.py", "c" * 700_000) for i in range(12)]
    train = data3.split("code", code)["train"]
    assert len(train) == 4 and sum(len(d.text) for d in train) == 2_800_000  # a fifth file would pass 3,000,000


def test_repeated_titles_are_numbered_in_file_order():
    docs = [data3.Doc("enc", f"wikitext:{t}", t) for t in ["<unk>", "Alpha", "<unk>", "<unk> <unk>"]]
    assert [d.doc_id for d in data3.numbered(docs)] == [
        "wikitext:<unk>#1",
        "wikitext:Alpha",
        "wikitext:<unk>#2",
        "wikitext:<unk> <unk>",
    ]


def _row(step: int, nll: float, acc: float) -> dict:
    return {"step": step, **{f"{s}-val/nll": nll for s in base3.SEEN}, **{f"{s}-val/acc": acc for s in base3.SEEN}}


def test_flatness_compares_the_last_tenth():
    flat = base3.flatness(
        [_row(2040, 3.0, 0.30), _row(2160, 2.504, 0.3500), _row(2280, 2.502, 0.3502), _row(2400, 2.5, 0.3505)]
    )
    assert flat["from_step"] == 2160 and flat["flat"] and flat["nll_gain"] == pytest.approx(0.004)
    steep = base3.flatness([_row(2160, 2.51, 0.35), _row(2400, 2.5, 0.35)])
    assert not steep["flat"] and steep["nll_gain"] == pytest.approx(0.01)
    gaining = base3.flatness([_row(2160, 2.5, 0.348), _row(2400, 2.5, 0.35)])
    assert not gaining["flat"]  # accuracy still rising by 0.002 >= δ_S


def _cand(method: str, lr: float, value: float | None, knob: float | None, s: float) -> Candidate:
    """A candidate as grid3 makes them (its run's spec, λ or r, and trained-model knob)."""
    src = grid3.source(method)
    trained = grid3.TRAINED_KNOB[grid3.MERGED[method][1]] if method in grid3.MERGED else 1.0
    return Candidate(method, grid3.run_spec(src, lr, value), lr, knob, s, option=value, trained_knob=trained)


def test_choice_ties_follow_section_3_on_grid3_candidates():
    """protocol.choose decides; grid3's candidates must carry what its tie order reads."""
    a, b = _cand("fisher", 3e-4, 0.01, None, 0.5), _cand("fisher", 1e-4, 0.1, None, 0.5)
    assert grid3.choose3([a, b]) is b  # smaller lr first
    c, d = _cand("fisher", 1e-4, 0.01, None, 0.5), _cand("fisher", 1e-4, 0.1, None, 0.5)
    assert grid3.choose3([d, c]) is c  # then the smaller λ
    e, f = _cand("direct+merge", 1e-4, None, 0.5, 0.5), _cand("direct+merge", 1e-4, None, 0.75, 0.5)
    assert grid3.choose3([e, f]) is f  # larger α is nearer the trained model
    g, h = _cand("direct+merge-fisher", 1e-4, None, 0.3, 0.5), _cand("direct+merge-fisher", 1e-4, None, 1.0, 0.5)
    assert grid3.choose3([h, g]) is g  # smaller λ_m is nearer it
    assert grid3.choose3([a, _cand("fisher", 1e-3, 0.1, None, 0.51)]).lr == 1e-3  # a higher S wins


def test_edges_extend_within_limits_then_flag():
    s = grid3.Search.initial(list(grid3.MERGED), smoke=False, drops=[])
    low = {"direct": _cand("direct", 1e-4, None, None, 0.5)}
    assert grid3.edges(low["direct"], s) == [("lr", "low")]
    assert grid3.extend(s, low) and s.lrs["direct"] == [1e-4, 3e-4, 1e-3, 3e-5]
    low = {"direct": _cand("direct", 3e-5, None, None, 0.5)}
    assert grid3.extend(s, low) and min(s.lrs["direct"]) == 1e-5
    low = {"direct": _cand("direct", 1e-5, None, None, 0.5)}
    assert not grid3.extend(s, low) and grid3.flags(low["direct"], s) == ["edge: lr low"]  # 2 extensions used
    interior = {"al": _cand("al", 3e-4, None, None, 0.5)}
    assert grid3.edges(interior["al"], s) == [] and not grid3.extend(s, interior)
    trained = _cand("direct+merge", 3e-4, None, 1.0, 0.5)
    assert grid3.edges(trained, s) == []  # α = 1 is no merge, not an edge
    alpha = {"dba-masked+merge": _cand("dba-masked+merge", 3e-4, None, 0.25, 0.5)}
    assert grid3.extend(s, alpha) and s.knobs["dba-masked+merge"][-1] == 0.125
    mixture = {"mixture": _cand("mixture", 3e-4, 0.6, None, 0.5)}
    dropped = grid3.Search.initial([], smoke=False, drops=["mixture_r08"])
    assert not grid3.extend(dropped, mixture) and grid3.flags(mixture["mixture"], dropped) == ["edge: ratio high"]
    assert grid3.extend(s, mixture) and s.values["mixture"][-1] == 0.8
    lam = {"fisher": _cand("fisher", 3e-4, 0.1, None, 0.5)}
    assert grid3.extend(s, lam) and s.values["fisher"] == [0.001, 0.01, 0.1, 1.0]


def test_paired_records_feed_the_bootstrap_seed_by_seed():
    import numpy as np
    import run3

    sets = {"medicine": "domain", **{g: "general" for g in base3.SEEN + base3.UNSEEN}}

    def run(correct: float) -> dict:  # every set: two records of 10 tokens, ``correct`` right in each
        return {"eval": {name: {"records": [[5.0, correct, 10.0]] * 2} for name in sets}}

    domain = {"kinds": sets, "test": {"al": {"1": run(3), "2": run(3)}, "dba": {"1": run(4), "2": run(5)}}}
    args = run3.paired_records(domain, "dba", "al", general="seen")
    assert args["domain"] == ["medicine"] and args["general"] == ["enc", "books", "code"]
    assert set(args["method"]) == {1, 2} and args["method"][2]["code"].tolist() == [[5.0, 5.0, 10.0]] * 2
    found = run3.verdicts(domain)["al"]["dba"]
    # accuracy 0.3 against 0.4 (seed 1) and 0.5 (seed 2) in every set: ΔS 0.1 and 0.2
    assert found["S"]["mean"] == pytest.approx(0.15) and found["S_seen"]["mean"] == pytest.approx(0.15)
    assert found["S"]["verdict"] == "ahead" and np.isclose(found["S_D"]["mean"], 0.15)


def test_smoke_never_writes_into_a_state_folder(tmp_path):
    import subprocess

    script = Path(__file__).parents[1] / "benchmarks" / "quality" / "run.py"
    cmd = [
        sys.executable,
        str(script),
        str(tmp_path),
        "--protocol",
        "3",
        "--smoke",
        "--state",
        str(tmp_path / "state3"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "quality3: --smoke never writes into a state folder: drop --state\n"
    assert not (tmp_path / "state3").exists()


def test_state_is_committed_on_the_run_branch_only(tmp_path):
    import subprocess

    import run3

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    git("commit", "-q", "--allow-empty", "-m", "start")
    state = tmp_path / "bench" / "state3"
    state.mkdir(parents=True)
    (state / "vocab.json").write_text("{}")
    run3.commit_state(state, "tokenizer")
    assert git("log", "--format=%s").splitlines() == ["start"]  # not the run's branch
    git("checkout", "-q", "-b", run3.RUN_BRANCH)
    run3.commit_state(state, "tokenizer")
    run3.commit_state(state, "nothing new")  # nothing staged: no empty commit
    assert git("log", "--format=%s").splitlines() == ["quality3 state: tokenizer", "start"]
    assert git("show", "--name-only", "--format=").split() == ["bench/state3/vocab.json"]
