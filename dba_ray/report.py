"""report.json and report.md: base model, every method, scores, raw metrics, deltas."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from dba_ray import storage


@dataclass
class RunRow:
    """One trained run of `dba-ray run`, as report.json's ``results`` hold it."""

    scores: dict  # the last evaluation: eval (per set), S_D, S_G, S (those the run has)
    wall_s: float
    tokens: int
    steps: int
    resumed_at: int
    model_dir: str
    method: str  # the run's name in `methods`
    lr: float
    validation: dict | None = None  # scores on eval.validation_sets

    def as_json(self) -> dict:
        out = {
            **self.scores,
            "wall_s": self.wall_s,
            "tokens": self.tokens,
            "steps": self.steps,
            "resumed_at": self.resumed_at,
            "model_dir": self.model_dir,
            "method": self.method,
            "lr": self.lr,
        }
        return _with_validation(out, self.validation)


@dataclass
class Cost:
    """What a compare run is charged (see dba_ray/compare.py)."""

    own_tokens: int
    own_wall_s: float
    worker_s: float
    total_tokens: int = 0
    total_wall_s: float = 0.0
    ratio_search_runs: int | None = None  # a mixture run: the runs of its ratio search

    def as_json(self) -> dict:
        out = {"own_tokens": self.own_tokens, "own_wall_s": self.own_wall_s, "worker_s": self.worker_s}
        if self.ratio_search_runs is not None:
            out["ratio_search_runs"] = self.ratio_search_runs
        return {**out, "total_tokens": self.total_tokens, "total_wall_s": self.total_wall_s}


@dataclass
class MixtureFacts:
    """How much general data a compare mixture run mixed in."""

    ratio: float
    general_sequences: int  # general rows it trained on
    general_reuse: int  # the most times one general sequence was used (cycled when short)


@dataclass
class CompareRow:
    """One run of `dba-ray compare` (a method at one lr and seed), as report.json holds it."""

    scores: dict  # S_D, S_G, S, eval (per set)
    tokens: int
    steps: int
    resumed_at: int  # the checkpoint step this run continued from (0: from the start)
    wall_s: float
    peak_mem_mb: float
    model_dir: str
    method: str  # the method's name in `methods` (shared by its lrs and seeds)
    family: str  # dba, direct, mixture or lora
    lr: float
    seed: int
    set: dict  # the overrides it ran with
    uses_global_gradient: bool
    num_workers: int
    mixture: MixtureFacts | None = None
    cost: Cost | None = None
    validation: dict | None = None

    def as_json(self) -> dict:
        out = {
            **self.scores,
            "tokens": self.tokens,
            "steps": self.steps,
            "resumed_at": self.resumed_at,
            "wall_s": self.wall_s,
            "peak_mem_mb": self.peak_mem_mb,
            "model_dir": self.model_dir,
            "method": self.method,
            "family": self.family,
            "lr": self.lr,
            "seed": self.seed,
            "set": self.set,
            "uses_global_gradient": self.uses_global_gradient,
            "num_workers": self.num_workers,
        }
        if self.mixture is not None:
            out.update(vars(self.mixture))
        if self.cost is not None:
            out["cost"] = self.cost.as_json()
        return _with_validation(out, self.validation)


def _with_validation(row: dict, validation: dict | None) -> dict:
    return row if validation is None else {**row, "validation": validation}


def _deltas(metrics: dict, base: dict) -> dict:
    return {
        name: {k: v - base[name][k] for k, v in m.items() if k in base.get(name, {}) and k != "records"}
        for name, m in metrics.items()
    }


def run_facts(cfg, prepared, wall_s: float, merges, cost_unit: str | None = None) -> dict:
    """The report's keys beside the results that `run` and `compare` share: the base
    model, the Stage 1 summary, the wall time and the merge curves (compare adds its
    cost unit)."""
    facts = {
        "base_model": cfg.model.name_or_path,
        "stage1": prepared.stage1.as_json() if prepared.stage1 else None,
        "total_wall_s": wall_s,
    }
    if cost_unit is not None:
        facts["cost_unit"] = cost_unit
    return {**facts, "merges": merges}


def build_report(base: dict, results: dict[str, dict | RunRow | CompareRow], extra: dict) -> dict:
    """``base``: {"eval": per-set metrics, "S_D", "S_G", "S"}; ``results``: trained runs'
    rows, or (`dba-ray eval`) scores alone, by name."""
    out = {"base": base, "results": {}, **extra}
    for name, r in results.items():
        row = r if isinstance(r, dict) else r.as_json()
        out["results"][name] = {**row, "delta": _deltas(row["eval"], base["eval"])}
    return out


def verdict(report: dict) -> str:
    """One plain sentence: which method kept more general ability, at what domain gain."""
    res, base = report["results"], report["base"]
    if "dba" not in res or "direct" not in res:
        return ""
    d, v = res["dba"], res["direct"]
    kept = "dba" if d["S_G"] > v["S_G"] else "direct"
    return (
        f"{kept} kept more general ability (S_G {res[kept]['S_G']:.3f} vs "
        f"{res['direct' if kept == 'dba' else 'dba']['S_G']:.3f}, base {base['S_G']:.3f}); "
        f"the domain score went from {base['S_D']:.3f} to {d['S_D']:.3f} with dba and "
        f"{v['S_D']:.3f} with direct, so the joint score S is {d['S']:.3f} for dba and "
        f"{v['S']:.3f} for direct."
    )


def best_per_method(report: dict) -> list[str]:
    """For a comparison over learning rates and seeds: each method's best run by S."""
    best: dict[str, tuple[float, str]] = {}
    for name, r in report["results"].items():
        method = r.get("method", name)
        if not math.isnan(r["S"]) and r["S"] > best.get(method, (-1.0, ""))[0]:
            best[method] = (r["S"], name)
    if len(best) == len(report["results"]):
        return []  # one run per method: the table says it all
    ranked = sorted(best.items(), key=lambda x: -x[1][0])
    return ["", "Best run per method by S: " + "; ".join(f"{m} {s:.4f} ({n})" for m, (s, n) in ranked) + "."]


def merges_markdown(merges: dict) -> str:
    """The merge curves of report.json as a table (knob chosen on validation marked *)."""
    if not merges:
        return ""
    first = next(iter(merges.values()))
    knob = "α" if first["mode"] == "linear" else "λ"
    lines = [
        f"Merge curves toward the base ({first['mode']}, knob {knob}; * = chosen on validation S):",
        "",
        f"| run | {knob} | S_D | S_G | S | validation S |",
        "|---|---|---|---|---|---|",
    ]
    for run, c in merges.items():
        for p in c["points"]:
            mark = " *" if p["knob"] == c["chosen"] else ""
            val = f"{p['validation']['S']:.4f}" if p["validation"] else "-"
            t = p["test"]
            lines.append(f"| {run} | {p['knob']:g}{mark} | {t['S_D']:.4f} | {t['S_G']:.4f} | {t['S']:.4f} | {val} |")
    cost = sum(c["eval_tokens"] for c in merges.values())
    fisher = sum(c["fisher_tokens"] for c in merges.values())
    lines += [
        "",
        f"Merge cost (apart from training): {cost:,} evaluated tokens"
        + (f" and {fisher:,} tokens of domain-Fisher passes" if fisher else "")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def markdown(report: dict, wall_times: bool = True) -> str:
    """report.md; ``wall_times`` False leaves out the one column that depends on the
    machine (the README's copy of the quickstart's tables, benchmarks/readme_tables.py)."""
    sets = list(report["base"]["eval"])
    head = ["run", "S_D", "S_G", "S"] + [f"{s} NLL" for s in sets] + [f"{s} acc" for s in sets]
    head += ["tokens", "wall s"] if wall_times else ["tokens"]
    validated = "validation" in report["base"]
    if validated:  # eval.validation_sets: what choices are made on
        head += ["validation S"]
    costed = any("cost" in r for r in report["results"].values())
    if costed:  # `dba-ray compare`
        head += ["peak MB", "total cost (tokens)"]
    rows = [("base", report["base"], None)] + [(m, r, r) for m, r in report["results"].items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r, run in rows:
        cells = [name, _fmt(r["S_D"]), _fmt(r["S_G"]), _fmt(r["S"])]
        for s in sets:
            if "nll" not in r["eval"][s]:  # a multiple-choice set has accuracy only
                cells.append("-")
                continue
            delta = f" ({run['delta'][s]['nll']:+.3f})" if run else ""
            cells.append(f"{r['eval'][s]['nll']:.3f}{delta}")
        for s in sets:
            delta = f" ({run['delta'][s]['acc']:+.3f})" if run else ""
            cells.append(f"{r['eval'][s]['acc']:.3f}{delta}")
        trained = run is not None and run.get("tokens")  # `dba-ray eval` scores, trains nothing
        cells.append(f"{run['tokens']:,}" if trained else "")
        if wall_times:
            cells.append(f"{run['wall_s']:.0f}" if trained else "")
        if validated:
            cells.append(_fmt(r["validation"]["S"]))
        if costed:
            cells += [f"{run['peak_mem_mb']:.0f}", f"{run['cost']['total_tokens']:,}"] if run else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines + best_per_method(report))
    sentence = verdict(report)
    merges = merges_markdown(report.get("merges") or {})
    return text + ("\n\n" + sentence if sentence else "") + "\n" + ("\n" + merges if merges else "")


def write_report(out_dir: str, report: dict, name: str = "report") -> str:
    md = markdown(report)
    storage.write_bytes_atomic(storage.join(out_dir, f"{name}.json"), json.dumps(report, indent=1).encode())
    storage.write_bytes_atomic(storage.join(out_dir, f"{name}.md"), md.encode())
    return md
