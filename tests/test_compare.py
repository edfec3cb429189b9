"""`dba-ray compare` with every baseline on tiny data: the report, the costs, the plots,
the TensorBoard curves; on the session's cluster."""

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from conftest import make_docs, on_finished_base, write_jsonl
from safetensors.torch import load_file

from dba_ray.cli import main
from dba_ray.config import load_config
from dba_ray.model import load_model

pytestmark = pytest.mark.usefixtures("ray_cluster")


def tiny_tree(tmp_path) -> dict:
    gen = write_jsonl(tmp_path / "gen.jsonl", make_docs(60, seed=0))
    gen_eval = write_jsonl(tmp_path / "gen_eval.jsonl", make_docs(8, seed=2))
    dom = write_jsonl(tmp_path / "dom.jsonl", [{"text": f"def f{i}(x):\n    return x + {i}"} for i in range(40)])
    dom_eval = write_jsonl(tmp_path / "dom_eval.jsonl", [{"text": "def g(y):\n    return y + 1"}] * 4)
    return {
        "output_dir": str(tmp_path / "out"),
        "stage1": {"data": {"path": gen, "seq_len": 32}, "batch_size": 8},
        "train": {
            "data": {"path": dom, "seq_len": 32},
            "batch_size": 4,
            "max_steps": 4,
            "progress_interval_s": 5,
            "schedule": {"lr": 3e-3},
            "dba": {"boost": 8},
        },
        "eval": {
            "sets": [
                {"name": "dom", "kind": "domain", "data": {"path": dom_eval, "seq_len": 32}},
                {"name": "gen", "kind": "general", "data": {"path": gen_eval, "seq_len": 32}},
            ]
        },
    }


def test_compare_every_baseline_writes_report_costs_and_plots(tmp_path, finished_run):
    # On the session's pretrained base, reusing its ĝ_G (whose tokens DBA's cost counts).
    tree = on_finished_base(tiny_tree(tmp_path), finished_run)
    tree["methods"] = ["dba", "mixture", "lora"]
    tree["compare"] = {"mixture_ratios": [0.25]}
    tree["train"]["mixture"] = {"ratio": 0.5}
    tree["train"]["lora"] = {"r": 4}
    cfg_file = tmp_path / "compare.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    assert main(["compare", str(cfg_file)]) == 0

    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    res = report["results"]
    assert set(res) == {"dba", "mixture", "lora", "mixture-r0.25"}
    for r in res.values():
        assert 0 <= r["S_D"] <= 1 and 0 <= r["S_G"] <= 1
        assert r["tokens"] > 0 and r["wall_s"] > 0 and r["peak_mem_mb"] > 10
        assert set(r["delta"]) == {"dom", "gen"}
    # Equal domain steps: a mixture at r trains 4 / (1 - r) steps, the others 4.
    assert res["lora"]["steps"] == 4 and res["mixture"]["steps"] == 8 and res["mixture-r0.25"]["steps"] == 6
    # Costs: DBA pays for Stage 1, a mixture for its whole ratio search.
    s1 = report["stage1"]["tokens"]
    assert s1 > 0
    assert res["dba"]["cost"]["total_tokens"] == res["dba"]["tokens"] + s1
    assert res["lora"]["cost"]["total_tokens"] == res["lora"]["tokens"]
    search = res["mixture"]["tokens"] + res["mixture-r0.25"]["tokens"]
    assert res["mixture"]["cost"]["total_tokens"] == search == res["mixture-r0.25"]["cost"]["total_tokens"]
    assert res["mixture"]["cost"]["ratio_search_runs"] == 2
    # Sized by what the run trains (4 steps × 4 = 16 domain sequences, not the whole file):
    # r = 0.5 adds 16 general sequences, r = 0.25 adds 5.
    assert res["mixture"]["general_sequences"] == 16 and res["mixture-r0.25"]["general_sequences"] == 5
    assert res["mixture"]["general_reuse"] == 1
    assert "total cost (tokens)" in (out / "report.md").read_text()

    # LoRA comes back merged into a plain model: adapted projections moved, embeddings not.
    base = {n: p.detach() for n, p in load_model(load_config(cfg_file).model).named_parameters()}
    lora = load_file(f"{res['lora']['model_dir']}/model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(lora[q], base[q])
    assert torch.equal(lora["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not any("lora" in k for k in lora)

    for png in ("frontier.png", "dba_curves.png"):
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # not a blank canvas

    # Training curves: every step of the DBA run, with γ_t decaying, in JSON and TensorBoard.
    curves = [json.loads(line) for line in (_run_dir(res["dba"]) / "curves.jsonl").read_text().splitlines()]
    steps = [c for c in curves if c["kind"] == "train"]
    assert [c["step"] for c in steps] == [1, 2, 3, 4]
    assert steps[0]["gamma"] > steps[-1]["gamma"] > 0
    assert any(c["kind"] == "eval" and "S" in c for c in curves)
    assert list((_run_dir(res["dba"]) / "tensorboard").glob("events.out.tfevents.*"))
    assert _run_dir(res["dba"]).parent.parent == out / "compare" / "trials"


def _run_dir(result) -> Path:
    return Path(result["model_dir"]).parent


def test_lora_refuses_the_global_gradient(tmp_path, capsys):
    tree = tiny_tree(tmp_path)
    tree["methods"] = [{"name": "lora-ggb", "method": "lora", "set": {"dba.ggb": True}}]
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    assert main(["train", str(cfg_file), "--method", "lora-ggb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lora trains adapters only" in err


def test_mixture_takes_the_domain_rows_the_run_trains_and_cycles_short_general_data():
    import numpy as np

    from dba_ray.config import TrainConfig
    from dba_ray.data.order import global_batch_rows, mixture_domain_rows
    from dba_ray.trainer import _mix

    t = TrainConfig(batch_size=4, max_steps=3, seed=7)
    rows = mixture_domain_rows(t, 40)
    used = np.concatenate([global_batch_rows(s, 40, 4, 10, 7) for s in range(3)])
    assert sorted(rows) == sorted(used) and len(rows) == 12  # exactly what `direct` trains on
    assert len(mixture_domain_rows(t.model_copy(update={"max_steps": 30}), 40)) == 40  # past one epoch: all
    domain = {"input_ids": np.zeros((4, 2), np.int32), "labels": np.zeros((4, 2), np.int32)}
    general = {k: np.arange(6, dtype=np.int32).reshape(3, 2) + 1 for k in ("input_ids", "labels")}
    mixed = _mix(domain, general, 7, "mixture")
    assert len(mixed["input_ids"]) == 11
    assert mixed["input_ids"][4:, 0].tolist() == [1, 3, 5, 1, 3, 5, 1]  # 3 general rows, cycled
