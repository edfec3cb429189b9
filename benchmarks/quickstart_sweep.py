"""The evidence behind the quickstart's DBA settings: Stage 2 on the quickstart's base
model and ĝ_G (run `dba-ray run examples/quickstart.yaml` first, which caches both),
for a few learning rates and DBA settings, scored like the quickstart.

    python benchmarks/quickstart_sweep.py --out benchmarks/quickstart_sweep.jsonl
"""

from __future__ import annotations

import argparse
import json

from dba_ray.config import load_config
from dba_ray.data.arrays import tokenize_eval, tokenize_train
from dba_ray.prepare import ensure_base_model, ensure_global_gradient
from dba_ray.scoring import evaluate_models
from dba_ray.trainer import run_train

# (name, method, overrides of train.*); every knob a row depends on is set explicitly,
# so the grid does not move when the quickstart's defaults do.
GRID = [
    ("direct lr1e-3", "direct", {"schedule.lr": 1e-3}),
    ("direct lr3e-4", "direct", {"schedule.lr": 3e-4}),
    ("dba literal lr1e-3", "dba", {"schedule.lr": 1e-3, "dba.boost": 200}),
    ("dba literal lr3e-4", "dba", {"schedule.lr": 3e-4, "dba.boost": 200}),
    ("dba boost20 lr1e-3", "dba", {"schedule.lr": 1e-3, "dba.boost": 20}),
    ("dba boost20 dc=none lr1e-3", "dba", {"schedule.lr": 1e-3, "dba.boost": 20, "dba.dc": "none"}),
    ("dba boost20 lr3e-4", "dba", {"schedule.lr": 3e-4, "dba.boost": 20}),
    ("dba boost200 gamma_max 0.2 lr1e-3", "dba", {"schedule.lr": 1e-3, "dba.boost": 200, "dba.gamma_max": 0.2}),
    ("AL only (no GGB, no DC) lr1e-3", "dba", {"schedule.lr": 1e-3, "dba.ggb": False, "dba.dc": "none"}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/quickstart.yaml")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    base_cfg = ensure_base_model(load_config(args.config))
    ensure_global_gradient(base_cfg)
    eval_refs = tokenize_eval(base_cfg)
    train_ref = tokenize_train(base_cfg)
    base = evaluate_models(base_cfg, {"base": base_cfg.model.name_or_path}, eval_refs)["base"]
    rows = [{"name": "base", **{k: base[k] for k in ("S_D", "S_G", "S")}}]
    for name, method, overrides in GRID:
        cfg = load_config(args.config, [f"train.{k}={v}" for k, v in overrides.items()])
        cfg = ensure_base_model(cfg)
        cfg.train.progress_interval_s = 60
        r = run_train(cfg, method, train_ref=train_ref, eval_refs=eval_refs)
        rows.append({"name": name, **{k: r.metrics[k] for k in ("S_D", "S_G", "S")}})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("| run | S_D | S_G | S |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['S_D']:.4f} | {row['S_G']:.4f} | {row['S']:.4f} |")


if __name__ == "__main__":
    main()
