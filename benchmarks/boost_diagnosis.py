"""Why the global-gradient boost costs general ability under Adam: where a `dba` run's
weights moved that an AL-only run's did not, and how much comes back when they are reset.

    python benchmarks/boost_diagnosis.py PHASE_DIR --dba RUN --al RUN [--out diagnosis.json]

PHASE_DIR is a phase of the quality benchmark (benchmarks/quality/out/<regime>/<domain>/
<group>-grid: its config.yaml names the base model, ĝ_G / v_G, the domain data and the
test sets); RUN names a run in its report.json (e.g. ``dba_lr0.001``, ``al_lr0.001``:
same lr, same seed, same data order). It reports

1. per tensor: how far each run moved (‖θ_T − θ0‖), the cosine of the *extra*
   displacement (dba − AL) with −ĝ_G, and the share of that extra displacement that lies
   on weights the domain data hardly moves (√v_D below 1% of the tensor's mean √v_D,
   with v_D the domain data's mean squared gradient at θ0, from the Stage 1 job);
2. per embedding and output row, by token: mean ‖θ_T − θ0‖ for tokens that occur in the
   general training text but not the domain text, in the domain text, and in neither;
3. resets: the dba model with those rows (embedding, output, both), or every weight the
   domain hardly moves, put back to θ0, scored on the test sets beside dba and AL.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import ray
import torch
import yaml

from dba_ray import artifact
from dba_ray.config import Config
from dba_ray.data import build_sequences, collect_arrays
from dba_ray.data.arrays import tokenize_eval
from dba_ray.evaluate import score_sets
from dba_ray.merge_curves import base_tensors, domain_fisher
from dba_ray.model import load_model
from dba_ray.ray_runtime import ensure_ray

log = logging.getLogger("diagnosis")
QUIET = 0.01  # "hardly moved by the domain": √v_D below this fraction of its tensor's mean


def token_counts(cfg: Config, data, vocab: int) -> np.ndarray:
    arrays = collect_arrays(build_sequences(data, cfg.model))
    return np.bincount(arrays["input_ids"].reshape(-1), minlength=vocab)


def row_classes(cfg: Config, vocab: int) -> dict[str, np.ndarray]:
    general = token_counts(cfg, cfg.stage1.data, vocab) > 0
    domain = token_counts(cfg, cfg.train.data, vocab) > 0
    return {"general only": general & ~domain, "domain": domain, "neither": ~general & ~domain}


def displacement_table(theta0, dba, al, grad, v_d) -> list[dict]:
    rows = []
    for name, t0 in theta0.items():
        d_dba, d_al = dba[name].float() - t0.float(), al[name].float() - t0.float()
        extra = d_dba - d_al
        g = grad[name].float()
        root = v_d[name].float().sqrt()
        quiet = root < QUIET * root.mean() if root.mean() > 0 else torch.ones_like(root, dtype=torch.bool)
        extra_norm = float(extra.norm())
        rows.append(
            {
                "tensor": name,
                "moved_dba": float(d_dba.norm()),
                "moved_al": float(d_al.norm()),
                "extra": extra_norm,
                "cos_extra_minus_grad": float(
                    torch.nn.functional.cosine_similarity(extra.reshape(1, -1), -g.reshape(1, -1))
                )
                if extra_norm > 0 and float(g.norm()) > 0
                else 0.0,
                "extra_share_on_quiet_weights": float(extra[quiet].norm() ** 2 / max(extra_norm**2, 1e-30)),
                "quiet_fraction": float(quiet.float().mean()),
            }
        )
    return sorted(rows, key=lambda r: -r["extra"])


def row_table(theta0, dba, al, classes: dict[str, np.ndarray], names: dict[str, str]) -> list[dict]:
    out = []
    for which, name in names.items():
        for cls, mask in classes.items():
            idx = torch.from_numpy(np.nonzero(mask)[0])
            if len(idx) == 0:
                continue
            t0 = theta0[name].float()[idx]
            out.append(
                {
                    "rows": which,
                    "tokens": cls,
                    "count": len(idx),
                    "moved_dba": float((dba[name].float()[idx] - t0).norm(dim=1).mean()),
                    "moved_al": float((al[name].float()[idx] - t0).norm(dim=1).mean()),
                }
            )
    return out


def reset_scores(cfg: Config, dba_dir: str, theta0, classes, names, v_d, evals) -> dict[str, dict]:
    refs, kinds = evals
    sets = {n: ray.get(r) for n, r in refs.items()}

    def scored(model):
        return score_sets(model, sets, kinds, cfg.eval.batch_size, "cpu")

    general_only = torch.from_numpy(np.nonzero(classes["general only"])[0])
    resets = {
        "embedding rows (general-only tokens)": [names["embedding"]],
        "output rows (general-only tokens)": [names["output"]],
        "both": [names["embedding"], names["output"]],
    }
    out = {}
    for label, tensors in resets.items():
        model = load_model(cfg.model.model_copy(update={"name_or_path": dba_dir}))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in tensors:
                params[n][general_only] = theta0[n][general_only].to(params[n].dtype)
        out[label] = scored(model)
    model = load_model(cfg.model.model_copy(update={"name_or_path": dba_dir}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            root = v_d[n].float().sqrt()
            quiet = root < QUIET * root.mean() if root.mean() > 0 else torch.ones_like(root, dtype=torch.bool)
            p[quiet] = theta0[n].to(p.dtype)[quiet]
    out["every weight the domain hardly moves"] = scored(model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", type=Path, help="a quality-benchmark phase directory (config.yaml, report.json)")
    ap.add_argument("--dba", required=True, help="run name of the dba run in report.json")
    ap.add_argument("--al", required=True, help="run name of the AL-only run (same lr and seed)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = Config.model_validate(yaml.safe_load((args.phase / "config.yaml").read_text()))
    report = json.loads((args.phase / "report.json").read_text())
    dba_dir, al_dir = report["results"][args.dba]["model_dir"], report["results"][args.al]["model_dir"]
    ensure_ray(cfg.ray)
    theta0 = dict(base_tensors(cfg).items())
    dba = {
        n: p.detach() for n, p in load_model(cfg.model.model_copy(update={"name_or_path": dba_dir})).named_parameters()
    }
    al = {
        n: p.detach() for n, p in load_model(cfg.model.model_copy(update={"name_or_path": al_dir})).named_parameters()
    }
    grad = artifact.load(cfg.global_gradient_source())
    # v_D at θ0: the Stage 1 job on the domain data with the base as its model (cached).
    v_d_uri, _, _ = domain_fisher(cfg, cfg.model.name_or_path, str(args.phase / "domain_fisher_at_base"))
    v_d = artifact.load(v_d_uri).second_moment
    vocab = theta0["model.embed_tokens.weight"].shape[0]
    classes = row_classes(cfg, vocab)
    names = {"embedding": "model.embed_tokens.weight", "output": "lm_head.weight"}
    evals = tokenize_eval(cfg)

    def scores_of(model_dir: str) -> dict:
        model = load_model(cfg.model.model_copy(update={"name_or_path": model_dir}))
        arrays = {n: ray.get(r) for n, r in evals[0].items()}
        return score_sets(model, arrays, evals[1], cfg.eval.batch_size, "cpu")

    result = {
        "runs": {"dba": args.dba, "al": args.al},
        "tensors": displacement_table(theta0, dba, al, grad.mean, v_d),
        "rows": row_table(theta0, dba, al, classes, names),
        "scores": {
            "dba": scores_of(dba_dir),
            "al": scores_of(al_dir),
            **{f"dba, reset {k}": v for k, v in reset_scores(cfg, dba_dir, theta0, classes, names, v_d, evals).items()},
        },
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "| tensor | ‖Δ‖ dba | ‖Δ‖ AL | ‖extra‖ | cos(extra, −ĝ_G) | extra on quiet weights | quiet weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["tensors"][:12]:
        lines.append(
            f"| {r['tensor']} | {r['moved_dba']:.3f} | {r['moved_al']:.3f} | {r['extra']:.3f} | "
            f"{r['cos_extra_minus_grad']:+.3f} | {r['extra_share_on_quiet_weights']:.2f} | {r['quiet_fraction']:.2f} |"
        )
    lines += ["", "| rows | tokens | count | mean ‖Δ‖ dba | mean ‖Δ‖ AL |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['rows']} | {r['tokens']} | {r['count']} | {r['moved_dba']:.3f} | {r['moved_al']:.3f} |"
        for r in result["rows"]
    ]
    sets = list(result["scores"]["dba"]["eval"])
    lines += [
        "",
        "| model | S_D | S_G | S | " + " | ".join(f"{s} acc" for s in sets) + " |",
        "|---|---|---|---|" + "---|" * len(sets),
    ]
    for name, s in result["scores"].items():
        lines.append(
            f"| {name} | {s['S_D']:.4f} | {s['S_G']:.4f} | {s['S']:.4f} | "
            + " | ".join(f"{s['eval'][k]['acc']:.4f}" for k in sets)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
