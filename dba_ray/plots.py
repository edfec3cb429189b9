"""The two PNGs of `dba-ray compare`: S_G against S_D (one curve per method over its
learning rates) and the DBA runs' training curves."""

from __future__ import annotations

import io
import math
from collections import defaultdict

from dba_ray import storage


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    storage.write_bytes_atomic(uri, buf.getvalue())


def frontier(report: dict, uri: str, title: str = "") -> None:
    """One point per run; runs of one method joined in order of learning rate (mean
    over seeds, with the seeds' spread as error bars)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    groups: dict[str, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for r in report["results"].values():
        if not (math.isnan(r["S_D"]) or math.isnan(r["S_G"])):
            groups[r["method"]][r["lr"]].append((r["S_D"], r["S_G"]))
    for method, by_lr in sorted(groups.items()):
        lrs = sorted(by_lr)
        xs = [sum(p[0] for p in by_lr[lr]) / len(by_lr[lr]) for lr in lrs]
        ys = [sum(p[1] for p in by_lr[lr]) / len(by_lr[lr]) for lr in lrs]
        xerr = [_spread([p[0] for p in by_lr[lr]]) for lr in lrs]
        yerr = [_spread([p[1] for p in by_lr[lr]]) for lr in lrs]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=2, label=method)
        for x, y, lr in zip(xs, ys, lrs):
            ax.annotate(f"{lr:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    base = report["base"]
    ax.plot([base["S_D"]], [base["S_G"]], marker="*", markersize=12, color="black", linestyle="", label="base")
    ax.set_xlabel("S_D (domain score)")
    ax.set_ylabel("S_G (general score)")
    ax.set_title(title or "S_G against S_D (points labelled by peak lr)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, uri)
    plt.close(fig)


def _spread(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


CURVE_PANELS = (("loss", "training loss"), ("lr", "learning rate (× c_t)"), ("gamma", "γ_t"), ("cos", "cos(g_D, ĝ_G)"), ("c", "c_t"))


def training_curves(curves: dict[str, list[dict]], uri: str) -> None:
    """curves: run name → rows of curves.jsonl (the ``train`` rows are plotted)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4 * len(CURVE_PANELS), 3.4))
    for name, rows in sorted(curves.items()):
        steps = [r for r in rows if r["kind"] == "train"]
        for ax, (key, _) in zip(axes, CURVE_PANELS):
            pts = [(r["step"], r[key]) for r in steps if key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=name, linewidth=1)
    for ax, (_, label) in zip(axes, CURVE_PANELS):
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    _save(fig, uri)
    plt.close(fig)
