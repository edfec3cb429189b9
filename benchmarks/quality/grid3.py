"""One domain of the third protocol (PROTOCOL3.md §3–§5): seed 0's grids and merge
curves, scored on the validation sets only; grid extensions until every choice is
interior or flagged; the choices; seeds 1–3 at every choice, scored on the test sets
per record (what the bootstrap resamples); costs as spent. Every phase is a `dba-ray
compare` or `dba-ray merge`, cached under OUT/<domain>/<phase>/phase.json by the digest
of its settings, so a rerun resumes."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from base3 import Paths, machine_free
from protocol import Candidate, choose

from dba_ray.compare import run_compare
from dba_ray.config import Config, digest
from dba_ray.run import run_merge

log = logging.getLogger("quality")
NO_GGB = {"dba.ggb": False, "dba.dc": "none"}
TRAINED = {  # method: its run's settings (lr aside)
    "direct": {"method": "direct", "set": {}},
    "al": {"method": "dba", "set": NO_GGB},
    "dba": {"method": "dba", "set": {}},
    "dba-masked": {"method": "dba", "set": {"dba.boost_mode": "masked"}},
    "dba-update": {"method": "dba", "set": {"dba.boost_mode": "update"}},
    "fisher": {"method": "dba", "set": {**NO_GGB, "dba.anchor": "fisher"}},
    "mixture": {"method": "mixture", "set": {}},
}
SECOND_AXIS = {"fisher": ("dba.fisher_lambda", [0.001, 0.01, 0.1]), "mixture": ("mixture.ratio", [0.2, 0.4, 0.6])}
MERGED = {  # merged method: (its source, merge mode)
    "direct+merge": ("direct", "linear"),
    "direct+merge-fisher": ("direct", "fisher"),
    "fisher+merge": ("fisher", "linear"),
    "dba-masked+merge": ("dba-masked", "linear"),
    "mixture+merge": ("mixture", "linear"),
}
LRS = [1e-4, 3e-4, 1e-3]
LADDER = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
KNOBS = {"linear": [0.25, 0.5, 0.75, 0.875], "fisher": [0.1, 0.3, 1.0, 3.0, 10.0]}
TRAINED_KNOB = {"linear": 1.0, "fisher": 0.0}  # the merge knob that is the trained run itself
FISHER_MAX_TOKENS = 131_072
SEEDS = [1, 2, 3]
# The values an extension steps along (§3's table) and how many extensions an axis may
# have (per side for the ratio); past that, or past a ladder's end, the edge is flagged.
AXES = {
    "lr": (LADDER, 2),
    "lambda": ([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], 2),
    "ratio": ([0.1, 0.2, 0.4, 0.6, 0.8], 1),
    "alpha": ([0.0625, 0.125, 0.25, 0.5, 0.75, 0.875], 2),
    "lambda_m": ([0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], 2),
}
VALUE_AXIS = {"fisher": "lambda", "mixture": "ratio"}
MAX_ROUNDS = 4


def run_name(method: str, lr: float, value: float | None) -> str:
    return f"{method}{'' if value is None else f'-{value:g}'}_lr{lr:g}"


def run_spec(method: str, lr: float, value: float | None) -> dict:
    """A `compare` method entry for one training run at its own lr."""
    spec = TRAINED[method]
    extra = {SECOND_AXIS[method][0]: value} if value is not None else {}
    return {
        "name": run_name(method, lr, value),
        "method": spec["method"],
        "set": {**spec["set"], **extra, "schedule.lr": lr},
    }


@dataclass
class Search:
    """What seed 0 runs in one domain: each trained method's lrs and second-axis values,
    each merged method's knobs, the extensions made and the edges left."""

    lrs: dict[str, list[float]]
    values: dict[str, list[float]]
    knobs: dict[str, list[float]]
    used: dict[tuple, list[float]] = field(default_factory=dict)  # (method, axis, side): values added
    drops: list[str] = field(default_factory=list)  # §8's drops in force

    @classmethod
    def initial(cls, merged: list[str], smoke: bool, drops: list[str]) -> "Search":
        first = (lambda xs: xs[:1]) if smoke else list
        return cls(
            lrs={m: first(LRS) for m in TRAINED},
            values={m: first(v) for m, (_, v) in SECOND_AXIS.items()},
            knobs={m: first(KNOBS[MERGED[m][1]]) for m in merged},
            drops=drops,
        )

    def runs(self, method: str) -> list[tuple[float, float | None]]:
        return [(lr, v) for lr in sorted(self.lrs[method]) for v in sorted(self.values.get(method, [None]))]


# ---------------------------------------------------------------- choices and edges


def source(method: str) -> str:
    return MERGED[method][0] if method in MERGED else method


def choose3(cands: list[Candidate]) -> Candidate:
    """§3's choice (protocol.choose: the highest validation S; ties to the smaller lr,
    the smaller λ or r, then the knob nearer the trained model)."""
    if not cands:
        raise SystemExit("quality3: a method has no scored run to choose from")
    return choose(cands)


def edges(c: Candidate, s: Search) -> list[tuple[str, str]]:
    """(axis, side) of every axis on which the choice is the smallest or largest value
    tried. α = 1 and λ_m = 0 (the trained run) are "no merge", not edges; α only extends
    downward (its top is the trained run)."""

    def sides(v: float, tried: list[float]) -> list[str]:
        return (["low"] if v == min(tried) else []) + (["high"] if v == max(tried) else [])

    src = source(c.method)
    out = [("lr", side) for side in sides(c.lr, s.lrs[src])]
    if src in VALUE_AXIS:
        out += [(VALUE_AXIS[src], side) for side in sides(c.option, s.values[src])]
    if c.method in MERGED and c.knob != TRAINED_KNOB[MERGED[c.method][1]]:
        axis = "alpha" if MERGED[c.method][1] == "linear" else "lambda_m"
        out += [(axis, side) for side in sides(c.knob, s.knobs[c.method]) if axis == "lambda_m" or side == "low"]
    return out


def extend(s: Search, choices: dict[str, Candidate]) -> bool:
    """Add the next value on every axis a choice sits at the edge of, within §3's limits
    and §8's drops (a new lr or λ / r runs at every value of the other axis)."""
    added = False
    for c in choices.values():
        for axis, side in edges(c, s):
            owner = c.method if axis in ("alpha", "lambda_m") else source(c.method)
            tried = {"lr": s.lrs, "alpha": s.knobs, "lambda_m": s.knobs}.get(axis, s.values)[owner]
            if not _may_extend(s, owner, axis, side):
                continue
            ladder = AXES[axis][0]
            edge = min(tried) if side == "low" else max(tried)
            i = min(range(len(ladder)), key=lambda k: abs(ladder[k] - edge)) + (-1 if side == "low" else 1)
            if 0 <= i < len(ladder) and ladder[i] not in tried:
                tried.append(ladder[i])
                s.used.setdefault((owner, axis, side), []).append(ladder[i])
                added = True
    return added


def _may_extend(s: Search, owner: str, axis: str, side: str) -> bool:
    limit = AXES[axis][1]
    if axis == "lr" and "lr_extensions_beyond_first" in s.drops:
        limit = 1
    if axis == "ratio":  # one per side; §8 may drop the 0.8 run
        return not (side == "high" and "mixture_r08" in s.drops) and len(s.used.get((owner, axis, side), [])) < limit
    return sum(len(s.used.get((owner, axis, x), [])) for x in ("low", "high")) < limit


def flags(c: Candidate, s: Search) -> list[str]:
    """The edges a final choice still sits at, as printed in its table cell."""
    return [f"edge: {axis} {side}" for axis, side in edges(c, s)]


# ---------------------------------------------------------------- phases


class Domain:
    """One domain's phases and what they found: seed 0's runs (validation S, cost) and
    merge points by (mode, run), each knob's validation S."""

    def __init__(self, p: Paths, domain: str, base: str, drops: list[str], on_phase: Callable[[str], None]):
        self.p, self.domain, self.base = p, domain, base
        self.merged = [] if (domain == "finance" and "finance_combinations" in drops) else list(MERGED)
        self.search = Search.initial(self.merged, p.smoke, drops)
        self.trained: dict[str, dict] = {}
        self.points: dict[tuple[str, str], dict[float, float]] = {}
        self.merge_costs: dict[tuple[str, str], list[dict]] = {}
        self.phases: dict[str, dict] = {}  # wall seconds and load averages of every phase
        self.on_phase = on_phase  # called with a phase's label after it finishes
        self.base_validation: dict = {}
        self.base_test: dict = {}
        self.fisher_tokens = 4096 if p.smoke else FISHER_MAX_TOKENS  # F_D's budget (§3)

    def tree(self, split: str) -> dict:
        return self.p.tree(self.domain, self.base, split)

    def phase(self, name: str, tree: dict, kind: str) -> dict:
        """A `compare` or `merge` under OUT/<domain>/<name>, cached by its settings. Its runs
        go in a folder named by that digest: a crashed phase resumes its finished trials,
        and changed settings never pick up trials made with the old ones."""
        out = self.p.out / self.domain / name
        key = digest(tree)
        tree["output_dir"] = str(out / key[:12])
        done = out / "phase.json"
        if done.exists() and json.loads(done.read_text())["digest"] == key:
            saved = json.loads(done.read_text())
        else:
            machine_free(self.p.smoke)
            log.info("%s / %s: %s", self.domain, name, kind)
            load, start = os.getloadavg(), time.monotonic()
            report = (run_compare if kind == "compare" else run_merge)(Config.model_validate(tree))
            saved = {"digest": key, "report": report, "wall_s": time.monotonic() - start}
            saved["load"] = [list(load), list(os.getloadavg())]  # 1/5/15-minute averages at start and end
            out.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(saved, default=str))
            self.on_phase(f"{self.domain}/{name}")
        self.phases[name] = {"wall_s": saved["wall_s"], "load": saved["load"]}
        return saved["report"]

    def train_missing(self, round_: int) -> None:
        """Seed 0 of every grid run not yet trained, scored on the validation sets."""
        specs = [
            run_spec(m, lr, v)
            for m in TRAINED
            for lr, v in self.search.runs(m)
            if run_name(m, lr, v) not in self.trained
        ]
        if not specs:
            return
        tree = self.tree("validation")  # a grid run never sees a test set
        tree["methods"] = specs
        tree["compare"] = {"lrs": [], "seeds": [0], "max_concurrent": 2}
        name = f"grid-{round_}"
        report = self.phase(name, tree, "compare")
        self.base_validation = report["base"]
        for run, r in report["results"].items():
            self.trained[run] = {**r, "phase": name}

    def merge_missing(self, round_: int) -> None:
        """Every merge point the search asks for and no phase has scored yet, one `merge`
        phase per mode and set of knobs (validation sets only)."""
        groups: dict[tuple, dict[str, str]] = {}
        for method in self.merged:
            src, mode = MERGED[method]
            for run in self.merge_targets(src):
                missing = tuple(k for k in self.search.knobs[method] if k not in self.points.get((mode, run), {}))
                if missing:
                    groups.setdefault((mode, missing), {})[run] = self.trained[run]["model_dir"]
        for i, ((mode, knobs), models) in enumerate(sorted(groups.items())):
            tree = self.tree("validation")
            tree["merge"] = {"mode": mode, "knobs": list(knobs), "models": models}
            if mode == "fisher":
                tree["merge"]["fisher_max_tokens"] = self.fisher_tokens
            name = f"merge-{round_}-{i}-{mode}"
            for run, curve in self.phase(name, tree, "merge")["merges"].items():
                for point in curve["points"]:
                    self.points.setdefault((mode, run), {})[point["knob"]] = point["test"]["S"]
                cost = {k: curve[k] for k in ("eval_tokens", "fisher_tokens", "wall_s")}
                self.merge_costs.setdefault((mode, run), []).append({**cost, "phase": name})

    def merge_targets(self, src: str) -> list[str]:
        """The runs a source's merge curves are scored on: all of its grid runs, or (§8's
        second drop) only its chosen run."""
        if "merge_curves_on_chosen_runs_only" in self.search.drops:
            c = choose3(self.candidates(src))
            return [run_name(src, c.lr, c.option)]
        return [run_name(src, lr, v) for lr, v in self.search.runs(src)]

    def candidates(self, method: str) -> list[Candidate]:
        """Every option of ``method`` seed 0 has scored: its source's runs and, for a
        merged method, their merge points (the trained run is the knob nearest it)."""
        src = source(method)
        mode = MERGED[method][1] if method in MERGED else None
        out = []
        for lr, v in self.search.runs(src):
            name, spec = run_name(src, lr, v), run_spec(src, lr, v)
            if mode is None:
                out.append(Candidate(method, spec, lr, None, self.trained[name]["S"], option=v))
                continue
            trained = TRAINED_KNOB[mode]
            merged = self.points.get((mode, name), {})
            scored = {trained: self.trained[name]["S"]} | {
                k: merged[k] for k in self.search.knobs[method] if k in merged
            }
            out += [Candidate(method, spec, lr, k, s, option=v, trained_knob=trained) for k, s in scored.items()]
        return out

    def methods(self) -> list[str]:
        return list(TRAINED) + self.merged

    def sweep(self) -> dict[str, Candidate]:
        """Seed 0's grids and merge curves, extended round by round until every choice is
        interior or at its axis's last extension (the smoke setting: no extension)."""
        for round_ in range(MAX_ROUNDS + 1):
            self.train_missing(round_)
            self.merge_missing(round_)
            choices = {m: choose3(self.candidates(m)) for m in self.methods()}
            if self.p.smoke or round_ == MAX_ROUNDS or not extend(self.search, choices):
                return choices
        raise AssertionError("unreachable")

    def seeds(self, choices: dict[str, Candidate]) -> dict[str, dict[int, dict]]:
        """Seeds 1–3 at every distinct choice, scored on the test sets per record; a merged
        choice is its seeds' runs merged at the chosen knob. Method -> seed -> scores."""
        specs = {c.spec["name"]: c.spec for c in choices.values()}
        tree = self.tree("test")
        tree["methods"] = list(specs.values())
        seeds = SEEDS[:2] if self.p.smoke else SEEDS  # the bootstrap pairs two or more seeds
        tree["compare"] = {"lrs": [], "seeds": seeds, "max_concurrent": 2}
        report = self.phase("seeds", tree, "compare")
        self.base_test = report["base"]
        runs = {(r["method"], r["seed"]): (name, r) for name, r in report["results"].items()}
        out = {}
        for method, c in choices.items():
            by_seed = {s: runs[(c.spec["name"], s)] for s in seeds}
            mode = MERGED[method][1] if method in MERGED else None
            if mode is None or c.knob == TRAINED_KNOB[mode]:
                out[method] = {s: _scores(r) for s, (_, r) in by_seed.items()}
                continue
            tree = self.tree("test")
            tree["merge"] = {
                "mode": mode,
                "knobs": [c.knob],
                "models": {n: r["model_dir"] for n, r in by_seed.values()},
            }
            if mode == "fisher":
                tree["merge"]["fisher_max_tokens"] = self.fisher_tokens
            merges = self.phase(f"seeds-merge-{method}", tree, "merge")["merges"]
            out[method] = {s: merges[name]["points"][0]["test"] for s, (name, _) in by_seed.items()}
        return out

    def cost(self, method: str, c: Candidate, stage1_tokens: int) -> dict:
        """§5, counted from the run records: the whole search seed 0 ran for the choice
        (every lr, λ, r and merge point of its source, extensions included) and the knob
        search at the chosen lr (its λ, r or merge points there; None without a knob)."""
        src = source(method)
        runs = [run_name(src, lr, v) for lr, v in self.search.runs(src)]
        whole = self._tally(method, runs)
        has_knob = src in SECOND_AXIS or method in MERGED
        at_lr = self._tally(method, [n for n in runs if self.trained[n]["lr"] == c.lr]) if has_knob else None
        reads = (
            any(self.trained[n]["uses_global_gradient"] for n in runs) or MERGED.get(method, ("", ""))[1] == "fisher"
        )
        return {"whole_search": whole, "knob_search_at_lr": at_lr, "stage1_tokens": stage1_tokens if reads else 0}

    def _tally(self, method: str, runs: list[str]) -> dict:
        """Tokens and seconds of these seed-0 runs, with their merge points for a merged
        method: trained tokens, search evaluation tokens (each run's validation scoring
        and each merge point), F_D tokens, wall seconds, and the phases' load averages."""
        val_tokens = sum(sum(rec[2] for rec in m["records"]) for m in self.base_validation["eval"].values())
        merges = []
        if method in MERGED:
            merges = [m for n in runs for m in self.merge_costs.get((MERGED[method][1], n), [])]
        phases = {self.trained[n]["phase"] for n in runs} | {m["phase"] for m in merges}
        return {
            "runs": len(runs),
            "trained_tokens": sum(self.trained[n]["tokens"] for n in runs),
            "search_eval_tokens": int(len(runs) * val_tokens + sum(m["eval_tokens"] for m in merges)),
            "fd_tokens": sum(m["fisher_tokens"] for m in merges),
            "wall_s": sum(self.trained[n]["wall_s"] for n in runs) + sum(m["wall_s"] for m in merges),
            "load": {ph: self.phases[ph]["load"] for ph in sorted(phases)},
        }

    def result(self, stage1_tokens: int) -> dict:
        """The domain's choices, test scores per seed (per record), base scores and costs."""
        choices = self.sweep()
        test = self.seeds(choices)
        return {
            "choices": {
                m: {
                    "run": c.spec["name"],
                    "lr": c.lr,
                    "value": c.option,
                    "knob": c.knob,
                    "validation_S": c.validation_s,
                    "flags": flags(c, self.search),
                }
                for m, c in choices.items()
            },
            "test": test,
            "base": {"validation": _scores(self.base_validation), "test": _scores(self.base_test)},
            "kinds": {s["name"]: s["kind"] for s in self.tree("test")["eval"]["sets"]},
            "costs": {m: self.cost(m, c, stage1_tokens) for m, c in choices.items()},
            "phases": self.phases,  # the domain's machine time, test scoring and seeds included
            "search": {
                "lrs": self.search.lrs,
                "values": self.search.values,
                "knobs": self.search.knobs,
                "extensions": {"/".join(k): v for k, v in self.search.used.items()},
                "drops": self.search.drops,
            },
        }


def _scores(r: dict) -> dict:
    return {k: r[k] for k in ("S_D", "S_G", "S", "eval")}
