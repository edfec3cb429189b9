"""The quality benchmark on real text: which method, and where on the trade-off.

    python benchmarks/quality/run.py ../shared/data [--out DIR] [--regimes long short]
    python benchmarks/quality/run.py ../shared/data --protocol 3 ...   (PROTOCOL3.md: see run3.py)

DATA is laid out like ../shared/data. The rules (validation-only choices, unseen seeds,
paired intervals, the ahead / tie / behind rule) are in protocol.py and, written before
the runs, in benchmarks/RESULTS.md. Steps, each cached so that a rerun resumes:

1. pretrain a base on WikiText-2's training text minus its validation tenth;
2. ĝ_G and v_G once on the same text, and an SVD-compressed copy (rank hidden/8, the
   paper's 512 of 4096), shared by every domain and regime;
3. per regime (long: T = 1000 domain steps, γ_0 = 0.2 under the paper's rule; short:
   T = 40) and domain, `dba-ray compare` of every method at 4 peak lrs (LoRA its own
   range), seed 0, merge curves for direct and dba (long regime); the lr grid grows
   where a method's validation optimum sits at an end;
4. each method's choice (lr, and λ / ratio / α where it has one) on validation S;
5. seeds 1–3 at every choice; test scores, paired differences against `direct` and the
   best mixture, verdicts, costs; results.json, results.md and frontier PNGs here.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import carry  # noqa: E402
from protocol import Candidate, Cost, choose, edge_lrs, paired, total_tokens  # noqa: E402

from dba_ray import artifact  # noqa: E402
from dba_ray.compare import run_compare  # noqa: E402
from dba_ray.config import Config, digest  # noqa: E402
from dba_ray.curves import read_curves  # noqa: E402
from dba_ray.model import load_model  # noqa: E402
from dba_ray.plots import frontier  # noqa: E402
from dba_ray.prepare import ensure_base_model, ensure_global_gradient  # noqa: E402

HERE = Path(__file__).parent
log = logging.getLogger("quality")
DOMAINS = {
    "medicine": ("medicine/pubmedqa.train.jsonl", "medicine/pubmedqa.eval.jsonl"),
    "finance": ("finance/tatqa.train.jsonl", "finance/tatqa.eval.jsonl"),
}
LADDER = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]  # half-decade lr steps
LRS = [1e-4, 3e-4, 1e-3, 3e-3]
LORA_LRS = [3e-4, 1e-3, 3e-3, 1e-2]
SEEDS = [1, 2, 3]
FISHER_LAMBDAS = [0.01, 0.1, 1.0]
MIXTURE_RATIOS = [0.1, 0.25, 0.5]
MERGE_KNOBS = [0.25, 0.5, 0.75]  # α = 1 is the trained run itself, scored anyway
MERGED = {"direct+merge": "direct", "dba+merge": "dba"}
REGIMES = {"long": 1000, "short": 40}
# The short regime keeps the methods whose verdict may depend on T; the DC ablations
# and the compressed ĝ_G were indistinguishable from dba there before (RESULTS.md).
SHORT_METHODS = ["direct", "al", "dba", "dba-fisher", "fisher", "mixture", "lora", "dba-update", "dba-masked"]
MAX_EXTENSIONS = 2


def method_groups(svd_uri: str) -> dict[str, dict[str, list[dict]]]:
    """Groups of methods (each its own phases, so a group added later leaves the others'
    runs in place), each method with the training runs it chooses among (lr aside)."""
    no_ggb = {"dba.ggb": False, "dba.dc": "none"}
    return {
        "core": {
            "direct": [{"name": "direct", "method": "direct"}],
            "al": [{"name": "al", "method": "dba", "set": no_ggb}],
            "dba": [{"name": "dba", "method": "dba"}],
            "dba-svd": [{"name": "dba-svd", "method": "dba", "set": {"global_gradient": svd_uri}}],
            "dba-no-dc": [{"name": "dba-no-dc", "method": "dba", "set": {"dba.dc": "none"}}],
            "dba-pcgrad": [{"name": "dba-pcgrad", "method": "dba", "set": {"dba.dc": "pcgrad"}}],
            "dba-fisher": [
                {"name": "dba-fisher", "method": "dba", "set": {"dba.anchor": "fisher", "dba.fisher_lambda": 0.1}}
            ],
            "fisher": [
                {
                    "name": f"fisher-{lam:g}",
                    "method": "dba",
                    "set": {**no_ggb, "dba.anchor": "fisher", "dba.fisher_lambda": lam},
                }
                for lam in FISHER_LAMBDAS
            ],
            "mixture": [
                {"name": f"mixture-r{r:g}", "method": "mixture", "set": {"mixture.ratio": r}} for r in MIXTURE_RATIOS
            ],
        },
        "lora": {"lora": [{"name": "lora", "method": "lora"}]},
        # GGB that respects the optimizer (the boost issue): the paper's dba otherwise.
        "boost": {
            "dba-update": [{"name": "dba-update", "method": "dba", "set": {"dba.boost_mode": "update"}}],
            "dba-masked": [{"name": "dba-masked", "method": "dba", "set": {"dba.boost_mode": "masked"}}],
        },
    }


class Bench:
    """Paths and settings of one benchmark run."""

    def __init__(self, data: Path, out: Path, smoke: bool):
        self.data, self.out, self.smoke = data.resolve(), out.resolve(), smoke
        self.dest = self.out if smoke else HERE  # where results and plots go

    def tree(self, domain: str | None, steps: int | None = None) -> dict:
        train, evalset = DOMAINS[domain or "medicine"]
        text = (HERE / "base.yaml").read_text()
        text = text.replace("DOMAIN_TRAIN", train).replace("DOMAIN_EVAL", evalset)
        text = (
            text.replace("DOMAIN", domain or "medicine").replace("DATA", str(self.data)).replace("OUT", str(self.out))
        )
        tree = yaml.safe_load(text)
        if steps:
            tree["train"]["max_steps"] = steps
        if self.smoke:  # the whole path in minutes: tiny model, few steps, few sequences
            tree["model"]["builtin_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
            tree["pretrain"].update(max_steps=20, eval_every=10)
            tree["stage1"]["max_tokens"] = 20000
            tree["eval"]["max_sequences"] = 16
            tree["train"]["max_steps"] = max(2, (steps or 40) // 100)
        return tree


# ---------------------------------------------------------------- base and ĝ_G


def prepare_base(b: Bench) -> tuple[str, dict, dict]:
    """Base model (cached), ĝ_G + v_G, and the SVD-compressed copy."""
    tree = b.tree(None)
    tree["train"]["cpus_per_worker"] = 2  # one run: both cores
    cfg = ensure_base_model(Config.model_validate(tree))
    base = cfg.model.name_or_path
    stage1 = ensure_global_gradient(cfg).as_json()  # report.json's stage1
    svd_uri = str(b.out / "global_gradient_svd")
    hidden = tree["model"]["builtin_config"]["hidden_size"]
    if not (Path(svd_uri) / "meta.json").exists():
        full = artifact.load(stage1["uri"])
        artifact.save(svd_uri, full, overwrite=True, svd_rank=hidden // 8)
    curve = [r for r in read_curves(str(Path(base).parent)) if r["kind"] == "eval"]
    p = tree["pretrain"]
    info = {
        "path": base,
        "parameters": sum(x.numel() for x in load_model(cfg.model).parameters()),
        "tokens": p["max_steps"] * p["batch_size"] * p["data"]["seq_len"],
        "eval_curve": [{"step": r["step"], "nll": r.get("wikitext/nll")} for r in curve],
        "svd_rank": hidden // 8,
        "svd_relative_error": artifact.read_meta(svd_uri)["compression"]["relative_error"],
    }
    return base, stage1, {**info, "svd_uri": svd_uri}


# ---------------------------------------------------------------- phases


def phase(
    b: Bench,
    base: str,
    regime: str,
    domain: str,
    name: str,
    specs: list[dict],
    lrs: list[float],
    seeds: list[int],
    merge_runs: list[str] | None = None,
    knobs: list[float] | None = None,
) -> dict:
    """One `dba-ray compare` (cached by its settings) under OUT/regime/domain/name."""
    tree = b.tree(domain, REGIMES[regime])
    tree.pop("pretrain")
    tree["model"]["name_or_path"] = tree["model"]["tokenizer"] = base
    tree["model"].pop("builtin_config")
    tree["output_dir"] = str(b.out / regime / domain / name)
    tree["methods"] = specs
    tree["compare"] = {"lrs": lrs, "seeds": seeds, "max_concurrent": 2}
    merge_runs = [m for m in merge_runs or [] if m in {s["name"] for s in specs}]
    if merge_runs:
        tree["merge"] = {"mode": "linear", "knobs": knobs, "methods": merge_runs}
    key = digest(tree)
    done = Path(tree["output_dir"]) / "phase.json"
    if done.exists() and json.loads(done.read_text())["digest"] == key:
        return json.loads(done.read_text())["report"]
    log.info(
        "%s / %s / %s: %d specs × %d lrs × %d seeds", regime, domain, name, len(specs), max(len(lrs), 1), len(seeds)
    )
    Path(tree["output_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(tree["output_dir"]) / "config.yaml").write_text(yaml.safe_dump(tree))  # for boost_diagnosis.py
    report = run_compare(Config.model_validate(tree))
    done.write_text(json.dumps({"digest": key, "report": report}, default=str))
    return report


def candidates(method: str, specs: list[dict], reports: list[dict]) -> list[Candidate]:
    """Every option of ``method`` in the grid reports, with its validation S only."""
    names = {s["name"]: s for s in specs}
    out = []
    for rep in reports:
        for run, r in rep["results"].items():
            if r["method"] not in names:
                continue
            spec = names[r["method"]]
            out.append(Candidate(method, spec, r["lr"], None, r["validation"]["S"]))  # never r["S"]: a test score
            merged = (rep.get("merges") or {}).get(run)
            if method in MERGED and merged:
                out += [Candidate(method, spec, r["lr"], p["knob"], p["validation"]["S"]) for p in merged["points"]]
    if method in MERGED:  # the trained run is the α = 1 end of its own curve
        out = [c if c.knob is not None else Candidate(c.method, c.spec, c.lr, 1.0, c.validation_s) for c in out]
    return out


def grid(
    b: Bench, base: str, regime: str, domain: str, group: str, specs_by_method: dict[str, list[dict]]
) -> list[dict]:
    """Seed 0 of a group's methods over their lrs, extended until every validation
    optimum is interior. Each group is its own set of phases, so adding a group later
    leaves the others' finished runs in place."""
    specs = [s for ss in specs_by_method.values() for s in ss]
    merge_runs = [m for m in MERGED.values() if m in specs_by_method] if regime == "long" else None
    lrs = LORA_LRS if group == "lora" else LRS
    lrs = lrs[:1] if b.smoke else lrs
    reports = [phase(b, base, regime, domain, f"{group}-grid", specs, lrs, [0], merge_runs, MERGE_KNOBS)]
    for round_ in range(0 if b.smoke else MAX_EXTENSIONS):
        extra = []
        for method, mspecs in specs_by_method.items():
            cands = candidates(method, mspecs, reports)
            tried = sorted({c.lr for c in cands})
            side = edge_lrs(cands, tried)
            if side is None:
                continue
            i = LADDER.index(min(tried) if side == "low" else max(tried)) + (-1 if side == "low" else 1)
            if 0 <= i < len(LADDER):
                extra += [{**s, "set": {**s.get("set", {}), "schedule.lr": LADDER[i]}} for s in mspecs]
        if not extra:
            break
        reports.append(
            phase(b, base, regime, domain, f"{group}-extend-{round_ + 1}", extra, [], [0], merge_runs, MERGE_KNOBS)
        )
    return reports


def seed_runs(b: Bench, base: str, regime: str, domain: str, group: str, choices: dict[str, Candidate]) -> dict:
    """Seeds 1–3 at every choice of a group (one run per distinct spec and lr)."""
    specs, merged = {}, set()
    for method, c in choices.items():
        name = f"{c.spec['name']}_lr{c.lr:g}"
        specs[name] = {**c.spec, "name": name, "set": {**c.spec.get("set", {}), "schedule.lr": c.lr}}
        if method in MERGED and c.knob != 1.0:
            merged.add(name)
    knobs = sorted({c.knob for m, c in choices.items() if m in MERGED and c.knob != 1.0})
    seeds = SEEDS[:2] if b.smoke else SEEDS
    return phase(
        b,
        base,
        regime,
        domain,
        f"{group}-seeds",
        list(specs.values()),
        [],
        seeds,
        sorted(merged) or None,
        knobs or None,
    )


def seed_scores(report: dict, c: Candidate) -> dict[int, dict]:
    """Test scores by seed of a choice, in the seeds report (a merged choice: the point
    at its knob)."""
    name = f"{c.spec['name']}_lr{c.lr:g}"
    out = {}
    for run, r in report["results"].items():
        if r["method"] != name:
            continue
        if c.knob is None or c.knob == 1.0:
            out[r["seed"]] = {k: r[k] for k in ("S_D", "S_G", "S", "eval")}
        else:
            point = next(p for p in report["merges"][run]["points"] if p["knob"] == c.knob)
            out[r["seed"]] = point["test"]
    return out


# ---------------------------------------------------------------- one regime × domain


def evaluate_domain(b: Bench, base: str, regime: str, domain: str, groups: dict[str, dict], stage1: dict) -> dict:
    """Every group's grid, choices and seeds in one regime and domain; the tables' rows."""
    reports, choices, seeds, owner = [], {}, {}, {}
    for group, specs_by_method in groups.items():
        g_reports = grid(b, base, regime, domain, group, specs_by_method)
        methods = list(specs_by_method)
        if regime == "long":
            methods += [m for m, src in MERGED.items() if src in specs_by_method]
        g_choices = {m: choose(candidates(m, specs_by_method[MERGED.get(m, m)], g_reports)) for m in methods}
        seeds[group] = seed_runs(b, base, regime, domain, group, g_choices)
        reports += g_reports
        choices.update(g_choices)
        owner.update({m: group for m in g_choices})
    scores = {m: seed_scores(seeds[owner[m]], c) for m, c in choices.items()}
    s = {m: {seed: v["S"] for seed, v in by.items()} for m, by in scores.items()}
    rows = {}
    for m, c in choices.items():
        vals = scores[m]
        sets = next(iter(vals.values()))["eval"]
        rows[m] = {
            "choice": {"spec": c.spec["name"], "lr": c.lr, "knob": c.knob, "validation_S": c.validation_s},
            "seeds": sorted(vals),
            **{k: statistics.mean(v[k] for v in vals.values()) for k in ("S_D", "S_G", "S")},
            "per_set_acc": {k: statistics.mean(v["eval"][k]["acc"] for v in vals.values()) for k in sets},
            "vs_direct": vars(paired(s[m], s["direct"])) if m != "direct" else None,
            "vs_mixture": vars(paired(s[m], s["mixture"])) if m != "mixture" else None,
            "cost": vars(method_cost(m, c, reports, seeds[owner[m]], stage1)),
            "wall_s_per_run": _mean_wall(seeds[owner[m]], c),
        }
    base_scores = reports[0]["base"]
    plot = b.dest / f"{regime}_{domain}_frontier.png"
    frontier(
        {
            "base": base_scores,
            "results": {k: v for r in reports for k, v in r["results"].items()},
            "merges": {k: v for r in reports for k, v in (r.get("merges") or {}).items()},
        },
        str(plot),
        title=f"{domain}, T = {REGIMES[regime]}: S_G against S_D on the test sets (seed 0)",
    )
    return {
        "base": {k: base_scores[k] for k in ("S_D", "S_G", "S", "eval")},
        "methods": rows,
        "grid": [
            {
                run: {k: r[k] for k in ("method", "lr", "S_D", "S_G", "S", "validation")}
                for run, r in rep["results"].items()
            }
            for rep in reports
        ],
        "frontier_png": plot.name,
    }


def _mean_wall(report: dict, c: Candidate) -> float:
    name = f"{c.spec['name']}_lr{c.lr:g}"
    return statistics.mean(r["wall_s"] for r in report["results"].values() if r["method"] == name)


def method_cost(method: str, c: Candidate, grid_reports: list[dict], seeds: dict, stage1: dict) -> Cost:
    name = f"{c.spec['name']}_lr{c.lr:g}"
    run = next(r for r in seeds["results"].values() if r["method"] == name)
    runs = 1
    if c.spec["method"] == "mixture":  # the ratio search: one run per ratio, per domain
        runs = len(MIXTURE_RATIOS)
    eval_tokens = 0
    if method in MERGED:  # the merge curve of the chosen run (seed 0), forward only
        curve = next(
            (
                m
                for rep in grid_reports
                for k, m in (rep.get("merges") or {}).items()
                if rep["results"][k]["method"] == c.spec["name"] and rep["results"][k]["lr"] == c.lr
            ),
            None,
        )
        eval_tokens = curve["eval_tokens"] if curve else 0
    return Cost(run["tokens"], runs, stage1["tokens"] if run["uses_global_gradient"] else 0, eval_tokens)


# ---------------------------------------------------------------- tables


def markdown(results: dict) -> str:
    b = results["base"]
    lines = [
        f"Base: {b['parameters']:,} parameters, pretrained on {b['tokens']:,} tokens of WikiText-2 "
        f"(validation tenth held out); eval NLL by step: "
        + ", ".join(f"{p['step']}: {p['nll']:.3f}" for p in b["eval_curve"] if p["nll"] is not None)
        + f". ĝ_G SVD rank {b['svd_rank']}: relative error {b['svd_relative_error']:.3f}.",
        "",
    ]
    for regime, domains in results["regimes"].items():
        lines += [f"## Regime {regime}: T = {REGIMES[regime]} domain steps", ""]
        for domain, d in domains.items():
            base = d["base"]
            sets = list(base["eval"])
            lines += [
                f"### {regime} / {domain}",
                "",
                f"Base: S_D {base['S_D']:.4f}, S_G {base['S_G']:.4f}, S {base['S']:.4f}. Test scores: mean of "
                f"seeds {', '.join(map(str, next(iter(d['methods'].values()))['seeds']))} at each method's "
                "validation choice; Δ: paired difference in S, mean [95% interval]; verdict by the rule above.",
                "",
                "| method | choice (validation S) | S_D | S_G | "
                + " | ".join(f"{s} acc" for s in sets)
                + " | S | Δ S vs direct | vs direct | Δ S vs mixture | vs mixture |",
                "|---|---|---|---|" + "---|" * len(sets) + "---|---|---|---|---|",
            ]
            for m, r in sorted(d["methods"].items(), key=lambda x: -x[1]["S"]):
                ch = r["choice"]
                choice = f"{ch['spec']}, lr {ch['lr']:g}" + (f", α {ch['knob']:g}" if ch["knob"] is not None else "")
                cells = [m, f"{choice} ({ch['validation_S']:.4f})", f"{r['S_D']:.4f}", f"{r['S_G']:.4f}"]
                cells += [f"{r['per_set_acc'][s]:.4f}" for s in sets] + [f"{r['S']:.4f}"]
                for ref in ("vs_direct", "vs_mixture"):
                    iv = r[ref]
                    cells += ["—", "—"] if iv is None else [_iv(iv), _verdict(iv)]
                lines.append("| " + " | ".join(cells) + " |")
            lines += ["", f"![{regime} {domain} frontier]({d['frontier_png']})", ""]
        lines += cost_table(domains)
    return "\n".join(lines) + "\n"


def _iv(iv: dict) -> str:
    return f"{iv['mean']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]"


def _verdict(iv: dict) -> str:
    if iv["n"] < 2:
        return "n/a"
    return "ahead" if iv["low"] > 0 else "behind" if iv["high"] < 0 else "tie"


def cost_table(domains: dict) -> list[str]:
    first = next(iter(domains.values()))["methods"]
    lines = [
        "Cost in trained tokens (forward + backward; Stage 1 shared by all domains, the mixture's ratio "
        "search per domain; merge curves' evaluated tokens, forward only, apart), at the benchmark's run "
        "length and at 10× it:",
        "",
        "| method | tokens / run | runs / domain | Stage 1 | merge eval / domain | 1 domain | 4 | 10 | 1 domain, 10× T | 4, 10× | 10, 10× | wall s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in first.items():
        c = Cost(**r["cost"])
        cells = [m, f"{c.run_tokens:,}", str(c.runs_per_domain), f"{c.stage1_tokens:,}", f"{c.eval_tokens:,}"]
        cells += [f"{total_tokens(c, n, length):,}" for length in (1, 10) for n in (1, 4, 10)]
        lines.append("| " + " | ".join(cells) + f" | {r['wall_s_per_run']:.0f} |")
    return lines + [""]


# What makes a rerun resume: the base model and its curves, ĝ_G and its SVD copy, finished
# phases' phase.json and config.yaml; no run weights or checkpoints.
KEEP = [
    "global_gradient/*",
    "global_gradient_svd/*",
    "*/pretrain/*/pretrain/model/*",
    "*/pretrain/*/pretrain/curves.jsonl",
    "*/pretrain/*/pretrain/card.json",
    "*/*/*/phase.json",
    "*/*/*/config.yaml",
]


def carry_state(src: Path, dst: Path) -> None:
    """Copy what makes a rerun resume (``KEEP``) from ``src`` to ``dst``, leaving files
    ``dst`` has. A machine that does not keep OUT between sessions resumes from a copy
    kept in the repository (``--state``)."""
    carry.carry_state(src, dst, KEEP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="folder laid out like ../shared/data")
    ap.add_argument("--out", type=Path, help="where runs go (default: protocol 2 ./out, protocol 3 see run3.py)")
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    ap.add_argument("--smoke", action="store_true", help="tiny model and grid: checks the whole path in minutes")
    ap.add_argument("--state", type=Path, help="resume from (and add to) this copy of OUT's resumable state")
    ap.add_argument("--protocol", type=int, choices=[2, 3], default=2, help="3: PROTOCOL3.md, run by run3.py")
    args = ap.parse_args()
    if args.protocol == 3:
        import run3

        return run3.main(args)
    args.out = args.out or HERE / "out"
    if args.state:
        carry_state(args.state, args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    b = Bench(args.data, args.out, args.smoke)
    dest = b.dest
    start = time.monotonic()
    base, stage1, info = prepare_base(b)
    groups = method_groups(info.pop("svd_uri"))
    results = {"base": info, "stage1": stage1, "regimes": {}}
    # Domain by domain, both regimes each, so that a budget that runs out leaves whole
    # domains behind it.
    for domain in args.domains:
        for regime in args.regimes:
            chosen = (
                groups
                if regime == "long"
                else {g: {m: specs for m, specs in ms.items() if m in SHORT_METHODS} for g, ms in groups.items()}
            )
            d = evaluate_domain(b, base, regime, domain, chosen, stage1)
            results["regimes"].setdefault(regime, {})[domain] = d
            results["wall_s"] = time.monotonic() - start
            (dest / "results.json").write_text(json.dumps(results, indent=1, default=str))
            (dest / "results.md").write_text(markdown(results))
            if args.state:
                carry_state(args.out, args.state)
    print((dest / "results.md").read_text())


if __name__ == "__main__":
    main()
