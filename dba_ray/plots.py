"""The two PNGs of `dba-ray compare`: S_G against S_D (one curve per method over its
learning rates) and the DBA runs' training curves."""

from __future__ import annotations

import io
import math
from collections import defaultdict

from matplotlib.figure import Figure

from dba_ray import storage


def _save(fig, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    storage.write_bytes_atomic(uri, buf.getvalue())


# Runs whose joint score S falls this far below the base model's are left out of the
# frontier's zoomed panel, so that collapsed runs do not squeeze the useful region.
ZOOM_MARGIN = 0.05


def frontier(report: dict, uri: str, title: str = "") -> list[str]:
    """One point per run; runs of one method joined in order of learning rate (mean
    over seeds, with the seeds' spread as error bars); each run's merge curve toward the
    base (report["merges"]) as a thin dashed line in its method's colour. When some runs
    fall far below the base model, a second panel zooms in on the others. Returns the
    legend's labels."""
    groups: dict[str, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for r in report["results"].values():
        if not (math.isnan(r["S_D"]) or math.isnan(r["S_G"])):
            groups[r["method"]][r["lr"]].append((r["S_D"], r["S_G"], r["S"]))
    base = report["base"]
    near = [p for by_lr in groups.values() for pts in by_lr.values() for p in pts if p[2] >= base["S"] - ZOOM_MARGIN]
    n_all = sum(len(pts) for by_lr in groups.values() for pts in by_lr.values())
    panels = 2 if near and len(near) < n_all else 1
    # A bare Figure, not pyplot: files only, no GUI backend or global state on a cluster node.
    fig = Figure(figsize=(6.4 * panels, 4.8))
    axes = fig.subplots(1, panels, squeeze=False)
    merges = report.get("merges") or {}
    for ax in axes[0]:
        _frontier_panel(ax, groups, base)
        _merge_curves(ax, merges, report["results"], sorted(groups))
    ax = axes[0][0]
    ax.set_title(title or "S_G against S_D (points labelled by peak lr)")
    ax.legend(fontsize=7)
    if panels == 2:
        xs, ys = [p[0] for p in near] + [base["S_D"]], [p[1] for p in near] + [base["S_G"]]
        pad_x, pad_y = 0.1 * (max(xs) - min(xs)) + 1e-3, 0.1 * (max(ys) - min(ys)) + 1e-3
        zoom = axes[0][1]
        zoom.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
        zoom.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
        zoom.set_title(f"zoom: runs with S >= base S − {ZOOM_MARGIN:g}")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    _save(fig, uri)
    return labels


def _merge_curves(ax, merges: dict, results: dict, methods: list[str]) -> None:
    labelled = set()
    for run, curve in merges.items():
        method = results[run]["method"]
        pts = [(p["test"]["S_D"], p["test"]["S_G"]) for p in curve["points"]]
        label = None if method in labelled else f"{method} merged ({curve['mode']})"
        labelled.add(method)
        ax.plot(
            *zip(*pts),
            linestyle="--",
            linewidth=0.8,
            marker=".",
            alpha=0.7,
            label=label,
            color=_style(methods.index(method))["color"],
        )
        chosen = next((p for p in curve["points"] if p["knob"] == curve["chosen"]), None)
        if chosen is not None:  # the point chosen on validation sets
            ax.plot(
                [chosen["test"]["S_D"]],
                [chosen["test"]["S_G"]],
                marker="x",
                markersize=7,
                color=_style(methods.index(method))["color"],
                linestyle="",
            )


def _style(i: int) -> dict:
    """Ten colours; past ten lines the marker and line style tell them apart."""
    return {"color": f"C{i % 10}", "marker": "os^D"[i // 10 % 4], "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}


def _frontier_panel(ax, groups: dict[str, dict[float, list]], base: dict) -> None:
    for i, (method, by_lr) in enumerate(sorted(groups.items())):
        style = _style(i)
        lrs = sorted(by_lr)
        xs = [sum(p[0] for p in by_lr[lr]) / len(by_lr[lr]) for lr in lrs]
        ys = [sum(p[1] for p in by_lr[lr]) / len(by_lr[lr]) for lr in lrs]
        xerr = [_spread([p[0] for p in by_lr[lr]]) for lr in lrs]
        yerr = [_spread([p[1] for p in by_lr[lr]]) for lr in lrs]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, capsize=2, label=method, **style)
        for x, y, lr in zip(xs, ys, lrs):
            ax.annotate(f"{lr:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", clip_on=True)
    ax.plot([base["S_D"]], [base["S_G"]], marker="*", markersize=12, color="black", linestyle="", label="base")
    ax.set_xlabel("S_D (domain score)")
    ax.set_ylabel("S_G (general score)")
    ax.grid(alpha=0.3)


def _spread(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


CURVE_PANELS = (
    ("loss", "training loss"),
    ("lr", "learning rate (× c_t)"),
    ("gamma", "γ_t"),
    ("cos", "cos(g_D, ĝ_G)"),
    ("c", "c_t"),
)


def training_curves(curves: dict[str, list[dict]], uri: str) -> None:
    """curves: run name → rows of curves.jsonl (the ``train`` rows are plotted)."""
    fig = Figure(figsize=(4 * len(CURVE_PANELS), 3.4))
    axes = fig.subplots(1, len(CURVE_PANELS))
    for i, (name, rows) in enumerate(sorted(curves.items())):
        steps = [r for r in rows if r["kind"] == "train"]
        style = {**_style(i), "marker": None}
        for ax, (key, _) in zip(axes, CURVE_PANELS):
            pts = [(r["step"], r[key]) for r in steps if key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=name, linewidth=1, **style)
    for ax, (_, label) in zip(axes, CURVE_PANELS):
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    _save(fig, uri)
