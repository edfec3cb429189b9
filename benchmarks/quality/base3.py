"""The third protocol's settings and its shared stages (PROTOCOL3.md §1, §2, §8): the
config trees, the machine guard, the timing gate, pretraining with its flatness check,
and Stage 1. run3.py strings them together; grid3.py runs the domains."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import vocab3
from matplotlib.figure import Figure

from dba_ray.config import Config
from dba_ray.curves import read_curves
from dba_ray.data.records import read_text_records
from dba_ray.data.tokenize import record_arrays
from dba_ray.evaluate import score_sets, scored_tokens
from dba_ray.loss import token_loss_sum
from dba_ray.model import load_model
from dba_ray.prepare import ensure_base_model, ensure_global_gradient

log = logging.getLogger("quality")
DOMAINS = {
    "medicine": ("medicine/pubmedqa.train.jsonl", "medicine/pubmedqa.eval.jsonl"),
    "finance": ("finance/tatqa.train.jsonl", "finance/tatqa.eval.jsonl"),
}
SEEN, UNSEEN = ["enc", "books", "code"], ["shakespeare", "math"]
SEQ = 128
T = 1000
PRETRAIN = {"steps": 2400, "rerun_steps": 3600, "batch": 32, "eval_every": 120, "lr": 2e-3}
FLAT = {"nll": 0.005, "acc": 0.001}  # δ_NLL and δ_S: the smallest effects reported (§4)
MIN_FREE_GIB = 8
# The smoke setting: the whole path in minutes on a shared machine, written only under --out.
SMOKE = {"vocab": 512, "hidden": 32, "layers": 2, "pretrain_steps": 20, "eval_every": 10, "T": 4, "records": 6}


@dataclass
class Paths:
    data: Path  # laid out like ../shared/data
    general3: Path  # data3.py's output
    out: Path  # the runs (weights stay here, never in state3)
    smoke: bool

    @property
    def train_jsonl(self) -> Path:
        return self.general3 / "train.jsonl"

    def eval_sets(self, domain: str, split: str) -> list[dict]:
        """The five general sets and the domain's, per record; ``split``: validation or test."""
        train, evalset = DOMAINS[domain]
        shakespeare = (
            self.data / "general" / ("shakespeare.eval.jsonl" if split == "test" else "shakespeare.train.jsonl")
        )
        files = {f"{domain}": (self.data / (evalset if split == "test" else train), "domain")}
        files |= {k: (self.general3 / f"{k}.{split}.jsonl", "general") for k in ("enc", "books", "code", "math")}
        files["shakespeare"] = (shakespeare, "general")
        subset = {domain: "validation", "shakespeare": "validation"} if split == "validation" else {}
        return [
            {
                "name": name if split == "test" else f"{name}-val",
                "kind": kind,
                "per_record": True,
                "data": {"path": str(path), "seq_len": SEQ, "subset": subset.get(name, "all")},
            }
            for name, (path, kind) in files.items()
        ]

    def tree(self, domain: str, base: str, split: str) -> dict:
        """A Stage 2 config on ``base`` (settings of §2 and §3), scoring ``split``'s sets."""
        train, _ = DOMAINS[domain]
        return {
            "output_dir": str(self.out / domain),
            "model": {"name_or_path": base, "tokenizer": base},
            "stage1": self.stage1(),
            "train": {
                "data": {"path": str(self.data / train), "subset": "train", "seq_len": SEQ, "shuffle_seed": 0},
                "max_steps": SMOKE["T"] if self.smoke else T,
                "batch_size": 4,
                "num_workers": 1,
                "cpus_per_worker": 1,
                "progress_interval_s": 120,
                "global_gradient": str(self.out / "global_gradient"),
                "dba": {"boost": 200, "gamma_max": 1.0, "dc": "norm"},
                "schedule": {"lr": 3e-4, "anneal": True, "shape": "cosine", "warmup_ratio": 0.05, "min_lr_ratio": 0.1},
            },
            "eval": {
                "max_sequences": SMOKE["records"] if self.smoke else 100_000,
                "batch_size": 32,
                "sets": self.eval_sets(domain, split),
            },
            "ray": {"num_cpus": 4},
        }

    def stage1(self) -> dict:
        s1 = {"batch_size": 16, "num_workers": 2, "second_moment": True, "output": str(self.out / "global_gradient")}
        if self.smoke:
            s1["max_tokens"] = 20_000
        return {"data": {"path": str(self.train_jsonl), "seq_len": SEQ}, **s1}


# ---------------------------------------------------------------- the machine guard


def machine_free(smoke: bool) -> None:
    """§8: stop, starting nothing, if a raylet this process did not start is running or
    MemAvailable is under 8 GiB. The smoke setting, meant for a shared machine, only logs."""
    foreign = [pid for pid in _raylets() if not _descends_from(pid, os.getpid())]
    free = _mem_available_gib()
    problem = []
    if foreign:
        problem.append(f"a raylet this run did not start is running (pids {foreign})")
    if free < MIN_FREE_GIB:
        problem.append(f"MemAvailable is {free:.1f} GiB (< {MIN_FREE_GIB})")
    if problem and not smoke:
        raise SystemExit("quality3: stopping before the next phase: " + "; ".join(problem))
    if problem:
        log.info("smoke: the real run would stop here: %s", "; ".join(problem))


def _raylets() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == "raylet":
                pids.append(int(stat.parent.name))
        except OSError:
            continue
    return pids


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return math.inf


# ---------------------------------------------------------------- vocabulary and base


def vocabulary(p: Paths) -> tuple[str, dict]:
    """The tokenizer, the seed-0 model directory pretraining starts from, and §1's row
    counts (cached in OUT/vocab.json)."""
    tok = vocab3.train_tokenizer(p.train_jsonl, p.out / "tokenizer", SMOKE["vocab"] if p.smoke else vocab3.VOCAB)
    arch = None
    if p.smoke:
        arch = {**vocab3.ARCH, "hidden_size": SMOKE["hidden"], "num_hidden_layers": SMOKE["layers"]}
        arch["intermediate_size"] = 2 * SMOKE["hidden"]
    model0 = vocab3.write_model_dir(tok, p.out / "model0", arch)
    cached = p.out / "vocab.json"
    if not cached.exists():
        domains = {d: p.data / train for d, (train, _) in DOMAINS.items()}
        usage = vocab3.row_usage(tok, p.train_jsonl, domains)
        usage["parameters"] = sum(
            x.numel() for x in load_model(Config.model_validate(_model(model0)).model).parameters()
        )
        cached.write_text(json.dumps(usage, indent=1))
    return str(model0), json.loads(cached.read_text())


def _model(path: Path | str) -> dict:
    return {"model": {"name_or_path": str(path), "tokenizer": str(path)}}


def timing_gate(p: Paths, model0: str, domain: str = "medicine", steps: int = 50) -> dict:
    """§8 step 3: time ``steps`` domain steps (batch 4 × 128, one thread, as a run has one
    CPU) and one validation scoring of the real model, then project the whole protocol
    from §8's counts. Cached in OUT/timing.json; the projection decides what is dropped."""
    cached = p.out / "timing.json"
    if cached.exists():
        return json.loads(cached.read_text())
    cfg = Config.model_validate(p.tree(domain, model0, "validation"))
    torch.set_num_threads(1)
    model = load_model(cfg.model)
    tok = vocab3.PreTrainedTokenizerFast.from_pretrained(model0)
    train = record_arrays(read_text_records(cfg.train.data)[: 4 * steps], tok, SEQ)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    start = time.monotonic()
    for i in range(steps):
        rows = slice(4 * i % len(train["input_ids"]), 4 * i % len(train["input_ids"]) + 4)
        x, y = (torch.from_numpy(train[k][rows].astype(np.int64)) for k in ("input_ids", "labels"))
        loss, n = token_loss_sum(model, x, y)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_s = (time.monotonic() - start) / steps
    sets = {s.name: record_arrays(read_text_records(s.data), tok, SEQ) for s in cfg.eval.sets}
    start = time.monotonic()
    score_sets(model, sets, {s.name: s.kind for s in cfg.eval.sets}, 32, "cpu")
    val_s = time.monotonic() - start
    test = Config.model_validate(p.tree(domain, model0, "test")).eval.sets
    test_ratio = _tokens({s.name: record_arrays(read_text_records(s.data), tok, SEQ) for s in test}) / _tokens(sets)
    gate = {"step_s": step_s, "validation_scoring_s": val_s, "test_to_validation_tokens": test_ratio}
    gate |= projection(step_s, val_s, test_ratio)
    cached.write_text(json.dumps(gate, indent=1))
    return gate


def _tokens(sets: dict) -> int:
    return sum(scored_tokens(a) for a in sets.values())


def projection(step_s: float, val_s: float, test_ratio: float) -> dict:
    """Machine hours of §8's table from the measured times (a step, a validation scoring;
    a test scoring scales by its tokens): one thread per run, two runs (or one two-thread
    job) at a time on two cores, so machine time is half the summed single-thread time."""
    per_token = step_s / (4 * SEQ)  # forward + backward, one thread
    run_s = T * step_s
    hours = {
        "data_tokenizer": 0.25,
        "pretraining": (PRETRAIN["steps"] * PRETRAIN["batch"] * SEQ * per_token + 20 * val_s) / 2 / 3600,
        "stage1": 2.5e6 * per_token / 2 / 3600,
        "grid_per_domain": ((15 + 9 + 16.25) * run_s + 144 * val_s + 3 * 131_072 * per_token) / 2 / 3600,
        "seeds_per_domain": (3 * 13.3 * run_s + 51 * val_s * test_ratio) / 2 / 3600,
    }
    base = hours["data_tokenizer"] + hours["pretraining"] + hours["stage1"]
    total = base + 2 * (hours["grid_per_domain"] + hours["seeds_per_domain"])
    allowance = 0.1 * total  # extensions
    # What each of §8's drops saves: the extension allowance is split between the lr
    # extensions beyond the first and the mixture's r 0.8 runs; merge curves on every grid
    # run are 90 of a domain's 144 validation scorings (111 are merge points, 21 at the
    # chosen runs); finance's combinations are its remaining merge points and F_D passes.
    savings = {
        "lr_extensions_beyond_first": allowance / 2,
        "merge_curves_on_chosen_runs_only": 2 * 90 * val_s / 2 / 3600,
        "mixture_r08": allowance / 2,
        "finance_combinations": (21 * val_s + 3 * 131_072 * per_token) / 2 / 3600,
    }
    total += allowance
    drops = []
    for name, saved in savings.items():
        if total <= BUDGET_H:
            break
        drops.append(name)
        total -= saved
    return {"hours": hours, "allowance_h": allowance, "savings_h": savings, "total_h": total, "drops": drops}


BUDGET_H = 30


def pretrain_tree(p: Paths, model0: str, steps: int) -> dict:
    """The pretraining config: general3/train.jsonl, the five general validation sets
    scored every 120 steps (pretraining keeps a config's general sets)."""
    tree = p.tree("medicine", model0, "validation")
    tree["output_dir"] = str(p.out)
    tree["train"]["cpus_per_worker"] = 2  # one job: both cores
    tree["pretrain"] = {
        "data": {"path": str(p.train_jsonl), "seq_len": SEQ},
        "max_steps": SMOKE["pretrain_steps"] if p.smoke else steps,
        "batch_size": PRETRAIN["batch"],
        "eval_every": SMOKE["eval_every"] if p.smoke else PRETRAIN["eval_every"],
        "schedule": {"lr": PRETRAIN["lr"], "warmup_ratio": 0.05, "min_lr_ratio": 0.1},
    }
    return tree


def pretrain(p: Paths, model0: str) -> tuple[str, dict]:
    """The base (§1): 2,400 steps; if the last tenth is not flat, once more from scratch
    with 3,600. Returns the base's model directory and its curve with the check."""
    for steps in (PRETRAIN["steps"], PRETRAIN["rerun_steps"]):
        cfg = ensure_base_model(Config.model_validate(pretrain_tree(p, model0, steps)))
        base = cfg.model.name_or_path
        curve = [r for r in read_curves(str(Path(base).parent)) if r["kind"] == "eval"]
        check = flatness(curve)
        if check["flat"] or p.smoke:
            break
        log.info("base not flat after %d steps (%s): pretraining again with %d", steps, check, PRETRAIN["rerun_steps"])
    return base, {"steps": curve[-1]["step"], "curve": curve, "flatness": check}


def flatness(curve: list[dict]) -> dict:
    """§1's criterion over the last tenth of pretraining: the seen sets' mean validation
    NLL improves by less than δ_NLL and their mean accuracy by less than δ_S."""
    last = curve[-1]
    start = next(r for r in curve if r["step"] >= 0.9 * last["step"])

    def mean(row: dict, metric: str) -> float:
        return sum(row[f"{s}-val/{metric}"] for s in SEEN) / len(SEEN)

    nll_gain = mean(start, "nll") - mean(last, "nll")
    acc_gain = mean(last, "acc") - mean(start, "acc")
    return {
        "from_step": start["step"],
        "to_step": last["step"],
        "nll_gain": nll_gain,
        "acc_gain": acc_gain,
        "flat": nll_gain < FLAT["nll"] and acc_gain < FLAT["acc"],
    }


def global_gradient(p: Paths, base: str) -> dict:
    """ĝ_G and v_G from all of general3/train.jsonl (§1: batch 16 × 128, 2 workers)."""
    tree = p.tree("medicine", base, "validation")
    tree["train"].pop("global_gradient")  # Stage 2's pointer at this artifact: Stage 1 makes it
    return ensure_global_gradient(Config.model_validate(tree)).as_json()


def curve_png(curve: list[dict], path: Path) -> None:
    """§1's reported curve: validation NLL and accuracy of the five general sets by
    pretraining step, the last tenth (the flatness window) shaded."""
    fig = Figure(figsize=(10, 4))
    steps = [r["step"] for r in curve]
    for ax, metric in zip(fig.subplots(1, 2), ("nll", "acc")):
        for s in SEEN + UNSEEN:
            style = "-" if s in SEEN else "--"
            ax.plot(steps, [r[f"{s}-val/{metric}"] for r in curve], style, marker=".", label=s)
        ax.axvspan(0.9 * steps[-1], steps[-1], alpha=0.15, color="grey")
        ax.set_xlabel("pretraining step")
        ax.set_ylabel(f"validation {metric}")
    fig.axes[0].legend(title="seen (solid), unseen (dashed)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
