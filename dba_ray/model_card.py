"""Model cards: the README.md of every exported model directory, in the Hugging Face
model-card format, so the folder can be pushed to a model hub as it is.

YAML front matter (base_model, library_name, tags, datasets, and a model-index with
every eval set's metrics), then the method and its settings, the ĝ_G artifact's identity
and data fingerprint, and the scores S_D / S_G / S with raw metrics and deltas against
the base model. A Stage 2 run writes its card when it ends, with the facts kept in
``<run>/card.json``; ``run`` and ``compare`` rewrite it with the base model's scores
once they have them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import yaml

from dba_ray import __version__, storage
from dba_ray.artifact import ArtifactMeta
from dba_ray.config import Config, DataConfig, MethodSpec

CARD = "README.md"
FACTS = "card.json"


@dataclass
class CardFacts:
    """What a card says about one trained model, besides the base model's scores."""

    name: str  # the run's name (a method or a named variant)
    method: str  # one of config.METHODS
    base_model: str
    revision: str | None
    settings: dict  # what the run trained with (resolved train section, parts that apply)
    datasets: list[str]
    global_gradient: dict | None  # the ĝ_G artifact's identity, when the method used one
    steps: int
    tokens: int
    scores: dict  # {"S_D", "S_G", "S", "eval": {set: metrics}}
    kinds: dict[str, str] = field(default_factory=dict)  # set name: domain / general


def _source(d: DataConfig | None) -> list[str]:
    if d is None:
        return []
    return [d.hf_dataset if d.hf_dataset else d.path]


def facts_for_run(
    cfg: Config, spec: MethodSpec, grad_meta: ArtifactMeta | None, grad_source, metrics: dict, steps: int, tokens: int
) -> CardFacts:
    """``cfg`` as resolved for the run (its train section is what the run trained with)."""
    t = cfg.train
    settings = {
        "schedule": t.schedule.model_dump(),
        "optimizer": t.optimizer.model_dump(),
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "num_workers": t.num_workers,
        "max_steps": t.max_steps,
        "epochs": t.epochs,
        "seed": t.seed,
        "parallel": t.parallel,
    }
    if spec.method == "dba":
        settings["dba"] = t.dba.model_dump()
    if spec.method == "lora":
        settings["lora"] = t.lora.model_dump()
    if spec.method == "mixture":
        settings["mixture_ratio"] = t.mixture.ratio
    datasets = _source(t.data)
    if spec.method == "mixture":
        datasets += _source(t.mixture.data or cfg.stage1.data)
    grad = None
    if grad_meta is not None:
        grad = {
            "uri": grad_source if isinstance(grad_source, str) else "(Ray object store)",
            "created_at": grad_meta.created_at,
            "param_fingerprint": grad_meta.param_fingerprint,
            "data_fingerprint": grad_meta.data_fingerprint,
            "data": grad_meta.data_description,
            "tokens": grad_meta.tokens,
            "global_norm": grad_meta.global_norm,
        }
        datasets += [d for d in _source(cfg.stage1.data) if d not in datasets]
    elif grad_source is not None and not isinstance(grad_source, str):
        grad = {"uri": "(Ray object store)"}
    return CardFacts(
        name=spec.name,
        method=spec.method,
        base_model=cfg.model.name_or_path,
        revision=cfg.model.revision,
        settings=settings,
        datasets=datasets,
        global_gradient=grad,
        steps=steps,
        tokens=tokens,
        scores={k: metrics[k] for k in ("S_D", "S_G", "S", "eval") if k in metrics},
        kinds={s.name: s.kind for s in cfg.eval.sets},
    )


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def card_text(f: CardFacts, base: dict | None = None) -> str:
    """The card: front matter, then prose and tables. ``base``: the base model's scores
    ({"S_D", "S_G", "S", "eval"}), for deltas."""
    evals = f.scores.get("eval", {})
    index = [
        {
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"name": name, "type": name},
            "metrics": [{"name": k, "type": k, "value": v} for k, v in m.items() if _finite(v)],
        }
        for name, m in evals.items()
    ]
    front = {
        "base_model": f.base_model,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["dba-ray", f.method, "domain-adaptation", "fine-tuned"],
        "datasets": f.datasets,
        "model-index": [{"name": f.name, "results": index}],
    }
    base_name = f.base_model + (f" (revision {f.revision})" if f.revision else "")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {f.name}",
        "",
        f"A fine-tune of `{base_name}` on domain data with dba-ray {__version__} "
        f"(method `{f.method}`: {_METHOD_TEXT.get(f.method, f.method)}), {f.steps} optimizer steps, "
        f"{f.tokens:,} trained tokens. Data: {', '.join(f'`{d}`' for d in f.datasets) or 'n/a'}.",
        "",
        "## Scores",
        "",
        "S_D and S_G are the mean normalized scores of the domain and general evaluation sets; "
        "S is their harmonic mean.",
        "",
        "| score | this model | base | delta |",
        "|---|---|---|---|",
    ]
    for key in ("S_D", "S_G", "S"):
        mine, theirs = f.scores.get(key), (base or {}).get(key)
        delta = mine - theirs if _finite(mine) and _finite(theirs) else None
        lines.append(f"| {key} | {_num(mine)} | {_num(theirs)} | {'n/a' if delta is None else f'{delta:+.4f}'} |")
    lines += ["", "| eval set | kind | metric | this model | base | delta |", "|---|---|---|---|---|---|"]
    for name, m in evals.items():
        b = (base or {}).get("eval", {}).get(name, {})
        for k, v in ((k, v) for k, v in m.items() if k != "records"):  # per-record sums: in report.json
            delta = v - b[k] if _finite(v) and _finite(b.get(k)) else None
            lines.append(
                f"| {name} | {f.kinds.get(name, '')} | {k} | {_num(v)} | {_num(b.get(k))} | "
                f"{'n/a' if delta is None else f'{delta:+.4f}'} |"
            )
    lines += [
        "",
        "## Training settings",
        "",
        "```yaml",
        yaml.safe_dump(f.settings, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    g = f.global_gradient
    if g:
        lines += [
            "## Global gradient (ĝ_G)",
            "",
            "The mean gradient of general data at the base weights (Stage 1), blended into "
            "the domain steps or used by the fisher anchor.",
            "",
        ]
        lines += [f"- {k}: `{json.dumps(v) if isinstance(v, dict) else v}`" for k, v in g.items()]
        lines.append("")
    lines += [
        'Trained with dba-ray: Dynamic Boosted Annealing (Liu et al., "Finetune Once", '
        "arXiv 2509.26242) and its baselines on Ray.",
        "",
    ]
    return "\n".join(lines)


_METHOD_TEXT = {
    "dba": "Dynamic Boosted Annealing, global-gradient boosting, dynamic correction and an annealed "
    "learning rate as configured below",
    "direct": "plain full fine-tuning on the domain data",
    "mixture": "full fine-tuning on domain data mixed with general data",
    "lora": "LoRA adapters, merged into the weights",
}


def write_card(model_dir: str, facts: CardFacts, base: dict | None = None) -> None:
    """Write the card into the model folder and keep its facts beside it (``card.json``
    in the run folder), for a rewrite once the base model's scores are known."""
    storage.write_bytes_atomic(storage.join(model_dir, CARD), card_text(facts, base).encode())
    run_dir = os.path.dirname(model_dir.rstrip("/"))
    storage.write_bytes_atomic(storage.join(run_dir, FACTS), json.dumps(asdict(facts), indent=1).encode())


def write_cards(report: dict) -> None:
    """Rewrite each result's card with the scores of the report (base included)."""
    for r in report["results"].values():
        model_dir = r.get("model_dir")
        if not model_dir:
            continue
        path = storage.join(os.path.dirname(model_dir.rstrip("/")), FACTS)
        if not storage.exists(path):
            continue
        facts = CardFacts(**json.loads(storage.read_bytes(path)))
        facts.scores = {k: r[k] for k in ("S_D", "S_G", "S", "eval") if k in r}
        write_card(model_dir, facts, report["base"])
