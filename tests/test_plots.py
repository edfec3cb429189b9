"""The frontier PNG: a zoomed panel appears when some runs collapse far below the base."""

import matplotlib.image

from dba_ray.plots import frontier


def _report(collapsed: bool) -> dict:
    results = {
        f"direct_lr{lr:g}": {"method": "direct", "lr": lr, "S_D": 0.50 + lr * 50, "S_G": 0.60 - lr * 50, "S": 0.55}
        for lr in (1e-4, 3e-4, 1e-3)
    }
    if collapsed:
        results["dba_lr0.001"] = {"method": "dba", "lr": 1e-3, "S_D": 0.06, "S_G": 0.09, "S": 0.07}
    return {"base": {"S_D": 0.48, "S_G": 0.63, "S": 0.55}, "results": results}


def test_frontier_zooms_only_when_runs_collapse(tmp_path):
    widths = {}
    for collapsed in (False, True):
        frontier(_report(collapsed), str(tmp_path / f"{collapsed}.png"))
        image = matplotlib.image.imread(tmp_path / f"{collapsed}.png")
        assert image.ndim == 3 and image.std() > 0
        widths[collapsed] = image.shape[1]
    assert widths[True] > 1.7 * widths[False]  # a second panel beside the first
