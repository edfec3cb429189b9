"""The quality benchmark's third protocol (PROTOCOL3.md): a real vocabulary, two domains.

    python benchmarks/quality/data3.py              # the general corpus, once
    python benchmarks/quality/run.py ../shared/data --protocol 3 --out /work/quality3-out \\
        --state benchmarks/quality/state3
    python benchmarks/quality/run.py ../shared/data --protocol 3 --smoke   # minutes, under /tmp only

Stages, in §8's order, each cached so that a rerun resumes: the tokenizer and its row
counts; the timing gate (its projection decides §8's drops); pretraining and the
flatness check; Stage 1 (ĝ_G and v_G); per domain, seed 0's grids, merge curves and
extensions on the validation sets, the choices, and seeds 1–3 at every choice on the
test sets, per record, and §4's paired bootstrap against the references. results3.json
holds what the tables read: every test set's per-record [NLL sum, correct, tokens] for
the base and for each method, seed and set (``paired_records`` turns one comparison into
``protocol.bootstrap_paired``'s arguments), and the intervals with their verdicts. The smoke setting (tiny vocabulary, model and grids, 4 steps) checks the
whole path and writes only under its --out, never into state3.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path

import base3
import grid3
import numpy as np
from carry import carry_state
from protocol import bootstrap_paired

HERE = Path(__file__).parent
OUT = Path("/work/quality3-out")
SMOKE_OUT = Path("/tmp/quality3-smoke")
RUN_BRANCH = "quality3-run"
GENERAL_SETS = {"all": base3.SEEN + base3.UNSEEN, "seen": base3.SEEN, "unseen": base3.UNSEEN}
REFERENCES = ["al", "direct", "mixture"]  # §4: al primary
GENERAL3 = [Path("general3"), Path("/work/quality3-data/general3")]  # in DATA first (§1)
# What a rerun resumes from (state3): tokenizer, base and curves, ĝ_G / v_G, the gate and
# every finished phase's phase.json with its per-record sums; no run weights.
KEEP = [
    "tokenizer/*",
    "model0/*",
    "vocab.json",
    "timing.json",
    "pretrain/*/pretrain/model/*",
    "pretrain/*/pretrain/curves.jsonl",
    "pretrain/*/pretrain/card.json",
    "global_gradient/*",
    "*/*/phase.json",
]
log = logging.getLogger("quality")


def general3(data: Path) -> Path:
    for candidate in GENERAL3:
        folder = candidate if candidate.is_absolute() else data / candidate
        if (folder / "train.jsonl").exists():
            return folder.resolve()
    raise SystemExit("quality3: no general3/train.jsonl in DATA or /work/quality3-data: run data3.py first")


def paired_records(domain: dict, method: str, reference: str, general: str = "all") -> dict:
    """``protocol.bootstrap_paired``'s arguments for one comparison in one domain's
    results: each run's test sets as seed -> set -> [records, 3] (NLL sum, correct,
    tokens), the domain sets, and the general sets that S_G counts (§4: all five, the
    three seen, or the two unseen)."""

    def sums(m: str) -> dict[int, dict[str, np.ndarray]]:
        by_seed = domain["test"][m].items()
        return {
            int(s): {k: np.asarray(v["records"], dtype=np.float64) for k, v in sc["eval"].items()} for s, sc in by_seed
        }

    return {
        "method": sums(method),
        "reference": sums(reference),
        "domain": [k for k, kind in domain["kinds"].items() if kind == "domain"],
        "general": GENERAL_SETS[general],
    }


def verdicts(domain: dict) -> dict:
    """§4's paired bootstrap of every method against `al`, `direct` and the chosen
    `mixture` (ΔS, ΔS_D, ΔS_G with S_G over all five general sets, and ΔS with S_G over
    the three seen), with their verdicts."""
    out: dict = {}
    for reference in [r for r in REFERENCES if r in domain["test"]]:  # every one, in a full run
        for method in domain["test"]:
            if method == reference:
                continue
            for general in ("all", "seen"):
                found = bootstrap_paired(**paired_records(domain, method, reference, general))
                keys = ("S", "S_D", "S_G") if general == "all" else ("S",)
                for key in keys:
                    b = found[key]
                    row = {"mean": b.mean, "low": b.low, "high": b.high, "n": b.n, "verdict": b.verdict}
                    out.setdefault(reference, {}).setdefault(method, {})[key if general == "all" else "S_seen"] = row
    return out


def commit_state(state: Path, label: str) -> None:
    """§8: after each finished phase, state3 is committed, on branch quality3-run only
    (the frozen worktree's), so that a run elsewhere never commits by surprise."""
    state = state.resolve()
    git = ["git", "-C", str(state.parent)]
    branch = subprocess.run([*git, "branch", "--show-current"], capture_output=True, text=True).stdout.strip()
    if branch != RUN_BRANCH:
        log.info("state3 not committed: the branch is %r, not %s", branch, RUN_BRANCH)
        return
    subprocess.run([*git, "add", str(state)], check=True)
    if subprocess.run([*git, "diff", "--cached", "--quiet"]).returncode:
        subprocess.run([*git, "commit", "-q", "-m", f"quality3 state: {label}"], check=True)


def main(args: argparse.Namespace) -> None:
    if args.smoke and args.state:
        raise SystemExit("quality3: --smoke never writes into a state folder: drop --state")
    out = (args.out or (SMOKE_OUT if args.smoke else OUT)).resolve()
    p = base3.Paths(args.data.resolve(), general3(args.data.resolve()), out, args.smoke)
    out.mkdir(parents=True, exist_ok=True)
    if args.state:
        carry_state(args.state, out, KEEP)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    dest = out if args.smoke else HERE
    start = time.monotonic()

    def finished(label: str) -> None:
        if args.state:
            carry_state(out, args.state, KEEP)
            commit_state(args.state, label)

    def save(results: dict) -> None:
        results["wall_s"] = time.monotonic() - start
        (dest / "results3.json").write_text(json.dumps(results, indent=1, default=str))

    base3.machine_free(args.smoke)
    model0, vocab = base3.vocabulary(p)
    gate = base3.timing_gate(p, model0)
    log.info("timing gate: %.1f h projected, drops %s", gate["total_h"], gate["drops"] or "none")
    finished("tokenizer and timing gate")
    base3.machine_free(args.smoke)
    base, pretraining = base3.pretrain(p, model0)
    base3.curve_png(pretraining["curve"], dest / "pretraining_curve.png")
    finished("pretraining")
    base3.machine_free(args.smoke)
    stage1 = base3.global_gradient(p, base)
    finished("Stage 1")
    results = {"vocab": vocab, "timing": gate, "pretraining": pretraining, "stage1": stage1, "domains": {}}
    save(results)
    for domain in args.domains:
        d = grid3.Domain(p, domain, base, gate["drops"], finished)
        results["domains"][domain] = d.result(stage1["tokens"])
        results["domains"][domain]["bootstrap"] = verdicts(results["domains"][domain])
        save(results)
    print(f"results: {dest / 'results3.json'}")
