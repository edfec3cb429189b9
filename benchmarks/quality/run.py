"""The quality benchmark on real text: every method's S_G-against-S_D frontier per domain.

    python benchmarks/quality/run.py ../shared/data --out benchmarks/quality/out

DATA is a folder laid out like ../shared/data (general/wikitext2.{train,eval}.jsonl,
medicine/pubmedqa.*, finance/tatqa.*); any files with a "text" field work. Steps:

1. pretrain the base model on the general training text (cached; its eval-loss curve is
   recorded to show where it flattens);
2. ĝ_G and v_G once on the general training text, reused by every domain;
3. per domain, `dba-ray compare` of every method at three learning rates, equal domain
   steps (the mixture ratio search at r = 0.1 and 0.25 is part of it);
4. per domain, seeds 1 and 2 at each method's best learning rate (seed 0 is the grid's
   run), for mean ± std;
5. results.json, one frontier PNG per domain, and results.md (tables, S_G at equal domain
   score, costs).

Nothing here is tuned toward an answer: the grid is fixed before any run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
from pathlib import Path

import yaml

from dba_ray.compare import run_compare
from dba_ray.config import Config
from dba_ray.curves import read_curves
from dba_ray.model import load_model
from dba_ray.run import ensure_base_model

HERE = Path(__file__).parent
DOMAINS = {
    "medicine": ("medicine/pubmedqa.train.jsonl", "medicine/pubmedqa.eval.jsonl"),
    "finance": ("finance/tatqa.train.jsonl", "finance/tatqa.eval.jsonl"),
}
LRS = [1e-4, 3e-4, 1e-3]
# Every method of the issue; each sets the knobs it depends on explicitly.
METHODS = [
    "direct",
    "lora",
    {"name": "dba", "method": "dba"},  # the paper's defaults (base.yaml: boost 200, γ_max 1, DC norm, AL cosine)
    {"name": "dba-no-ggb", "method": "dba", "set": {"dba.ggb": False}},
    {"name": "dba-no-dc", "method": "dba", "set": {"dba.dc": "none"}},
    {"name": "dba-no-al", "method": "dba", "set": {"schedule.anneal": False}},
    {"name": "dba-pcgrad", "method": "dba", "set": {"dba.dc": "pcgrad"}},
    *[
        {"name": f"fisher-{lam:g}", "method": "dba",
         "set": {"dba.ggb": False, "dba.dc": "none", "dba.anchor": "fisher", "dba.fisher_lambda": lam}}
        for lam in (0.01, 0.1)
    ],
]
MIXTURE_RATIOS = [0.1, 0.25]
SEEDS = [1, 2]


def domain_config(data: Path, out: Path, domain: str | None) -> dict:
    train, evalset = DOMAINS[domain or "medicine"]
    text = (HERE / "base.yaml").read_text()
    text = text.replace("DOMAIN_TRAIN", train).replace("DOMAIN_EVAL", evalset)
    text = text.replace("DOMAIN", domain or "medicine").replace("DATA", str(data.resolve()))
    tree = yaml.safe_load(text)
    tree["output_dir"] = str(out / (domain or "shared"))
    tree["stage1"]["output"] = str(out / "global_gradient")
    return tree


def pretrain(data: Path, out: Path) -> tuple[str, dict]:
    tree = domain_config(data, out, None)
    tree["train"]["cpus_per_worker"] = 2  # one run: both cores
    cfg = ensure_base_model(Config.model_validate(tree))
    path = cfg.model.name_or_path
    curve = [r for r in read_curves(str(Path(path).parent)) if r["kind"] == "eval"]
    n_params = sum(p.numel() for p in load_model(cfg.model).parameters())
    p = tree["pretrain"]
    info = {
        "path": path, "parameters": n_params,
        "tokens": p["max_steps"] * p["batch_size"] * p["data"]["seq_len"],
        "eval_curve": [{"step": r["step"], "nll": r.get("wikitext/nll"), "acc": r.get("wikitext/acc")} for r in curve],
    }
    return path, info


def compare(data: Path, out: Path, domain: str, base: str, methods: list, lrs: list, seeds: list,
            mixture_ratios: list, sub: str = "") -> dict:
    tree = domain_config(data, out, domain)
    tree.pop("pretrain")
    tree["model"]["name_or_path"] = tree["model"]["tokenizer"] = base
    tree["model"].pop("builtin_config")
    tree["methods"] = methods
    tree["compare"] = {"lrs": lrs, "seeds": seeds, "mixture_ratios": mixture_ratios, "max_concurrent": 2}
    if sub:
        tree["output_dir"] += f"/{sub}"
    return run_compare(Config.model_validate(tree))


def best_points(report: dict) -> dict[str, float]:
    """Each method's learning rate with the highest S."""
    best: dict[str, tuple[float, float]] = {}
    for r in report["results"].values():
        if not math.isnan(r["S"]) and r["S"] > best.get(r["method"], (-1.0, 0.0))[0]:
            best[r["method"]] = (r["S"], r["lr"])
    return {m: lr for m, (_, lr) in best.items()}


def seed_methods(best: dict[str, float]) -> list:
    """The grid's methods again, each at its best learning rate."""
    specs = []
    for m in METHODS + [{"name": f"mixture-r{r:g}", "method": "mixture", "set": {"mixture.ratio": r}} for r in MIXTURE_RATIOS]:
        spec = {"name": m, "method": m} if isinstance(m, str) else dict(m)
        spec["set"] = {**spec.get("set", {}), "schedule.lr": best[spec["name"]]}
        specs.append(spec)
    return specs


def summarize(grid: dict, seeds: dict) -> dict:
    rows = {}
    for method, lr in best_points(grid).items():
        runs = [r for r in grid["results"].values() if r["method"] == method and r["lr"] == lr]
        runs += [r for r in seeds["results"].values() if r["method"] == method]
        row = {"lr": lr, "n": len(runs)}
        for k in ("S_D", "S_G", "S"):
            vals = [r[k] for r in runs]
            row[k] = statistics.mean(vals)
            row[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["cost_tokens"] = runs[0]["cost"]["total_tokens"]
        row["wall_s"] = statistics.mean(r["wall_s"] for r in runs)
        rows[method] = row
    return rows


def grid_by_method(grid: dict) -> dict[str, dict[float, dict]]:
    by: dict[str, dict[float, dict]] = {}
    for r in grid["results"].values():
        by.setdefault(r["method"], {})[r["lr"]] = r
    return by


def s_g_at(per_lr: dict[float, dict], s_d: float) -> float | None:
    """S_G where a method's curve (its runs joined in order of learning rate, as in the
    frontier plot) reaches domain score s_d, by linear interpolation; the highest such
    point if it crosses s_d more than once, None if it does not pass through s_d."""
    pts = [(per_lr[lr]["S_D"], per_lr[lr]["S_G"]) for lr in sorted(per_lr)]
    hits = [y for x, y in pts if x == s_d]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if min(x0, x1) < s_d < max(x0, x1):
            hits.append(y0 + (y1 - y0) * (s_d - x0) / (x1 - x0))
    return max(hits, default=None)


def frontier_table(by: dict[str, dict[float, dict]]) -> list[str]:
    """S_G of every method at direct's domain scores: who keeps more general ability for
    the same domain gain."""
    ref = by["direct"]
    lines = ["| method | " + " | ".join(f"S_D {ref[lr]['S_D']:.3f} (direct lr {lr:g})" for lr in sorted(ref)) + " |",
             "|---|" + "---|" * len(ref)]
    for m, per in by.items():
        cells = []
        for lr in sorted(ref):
            y = s_g_at(per, ref[lr]["S_D"])
            cells.append("—" if y is None else f"{y:.3f} ({y - ref[lr]['S_G']:+.3f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def above_direct_table(by: dict[str, dict[float, dict]]) -> list[str]:
    """The other view: each run's S_G minus direct's where direct's curve reaches the
    run's S_D. With three points per curve the two views can differ in sign; a method
    is ahead of direct on the frontier only where both say so."""
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " |", "|---|" + "---|" * len(LRS)]
    for m, per in by.items():
        if m == "direct":
            continue
        cells = []
        for lr in LRS:
            y = s_g_at(by["direct"], per[lr]["S_D"]) if lr in per else None
            cells.append("—" if y is None else f"{per[lr]['S_G'] - y:+.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    lines = [f"Base model: {results['base']['parameters']:,} parameters, pretrained on "
             f"{results['base']['tokens']:,} tokens; eval NLL by step: "
             + ", ".join(f"{p['step']}: {p['nll']:.3f}" for p in results["base"]["eval_curve"]), ""]
    for domain, d in results["domains"].items():
        b = d["grid"]["base"]
        lines += [f"### {domain}", "", f"Base: S_D {b['S_D']:.4f}, S_G {b['S_G']:.4f}, S {b['S']:.4f}.", "",
                  "Grid (seed 0): S_D / S_G / S per learning rate", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " |", "|---|" + "---|" * len(LRS)]
        by = grid_by_method(d["grid"])
        for m, per in by.items():
            cells = [f"{per[lr]['S_D']:.3f} / {per[lr]['S_G']:.3f} / {per[lr]['S']:.3f}" if lr in per else "" for lr in LRS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "Frontier at equal domain score (seed 0): each method's S_G where its curve (runs joined "
                  "in order of lr, as in the plot) reaches direct's S_D, and the difference from direct; "
                  "— where its curve does not pass through that S_D", ""] + frontier_table(by)
        lines += ["", "The same frontier seen from each run (seed 0): its S_G minus direct's S_G where "
                  "direct's curve reaches the run's S_D; — outside direct's range", ""] + above_direct_table(by)
        lines += ["", "Best lr per method, 3 seeds (mean ± std); total cost in trained tokens (Stage 1 "
                  "charged to methods that use ĝ_G, the ratio search to mixture)", "",
                  "| method | lr | S_D | S_G | S | total cost (tokens) | wall s / run |", "|---|---|---|---|---|---|---|"]
        for m, r in sorted(d["summary"].items(), key=lambda x: -x[1]["S"]):
            lines.append(
                f"| {m} | {r['lr']:g} | {r['S_D']:.4f} ± {r['S_D_std']:.4f} | {r['S_G']:.4f} ± {r['S_G_std']:.4f} "
                f"| {r['S']:.4f} ± {r['S_std']:.4f} | {r['cost_tokens']:,} | {r['wall_s']:.0f} |"
            )
        lines += ["", f"![{domain} frontier]({domain}_frontier.png)", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="folder laid out like ../shared/data")
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = args.out.resolve()
    base, info = pretrain(args.data, out)
    results = {"base": info, "domains": {}}
    for domain in args.domains:
        grid = compare(args.data, out, domain, base, METHODS, LRS, [0], MIXTURE_RATIOS)
        seeds = compare(args.data, out, domain, base, seed_methods(best_points(grid)), [], SEEDS, [], sub="seeds")
        results["domains"][domain] = {"grid": grid, "seeds": seeds, "summary": summarize(grid, seeds)}
        for plot in ("frontier", "dba_curves"):
            shutil.copy(out / domain / f"{plot}.png", HERE / f"{domain}_{plot}.png")
        (HERE / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (HERE / "results.md").write_text(markdown(results))
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
