"""Standard benchmarks (lm-evaluation-harness), experiment tracking (MLflow, W&B) and
model cards, checked on one small `dba-ray run` of two methods over a base model saved
as a Hugging Face model directory. Offline: the harness tasks are YAML files over JSONL
files written here; MLflow is a local file store (and a real `mlflow server` on
127.0.0.1); W&B runs in offline mode."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import make_docs, write_jsonl
from dba_ray.cli import main

pytestmark = pytest.mark.usefixtures("ray_cluster")

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install -e '.[lmeval]')")

MC = [
    {"question": "def f(x): return", "choices": ["x + 1", "the cat"], "answer": 0},
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1},
    {"question": "def g(y):", "choices": ["return y", "blue sky"], "answer": 0},
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo"], "answer": 2},
]
QUESTIONS = ["1 + 1 =", "say a", "def f(x):", "the model"]
GEN_KWARGS = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}


def _task_yaml(path, name, data_file, **fields) -> str:
    tree = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test", **fields,
    }
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _harness_direct(model_dir: str, task_files: list[str]) -> dict:
    """The harness's own numbers for a saved model: its `hf` backend loading the
    directory with AutoModelForCausalLM / AutoTokenizer, as a user would run it."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": model_dir, "dtype": "float32"}, device="cpu",
        tasks=task_files, task_manager=TaskManager(), log_samples=False,
    )
    return out["results"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One `dba-ray run` (dba and direct) with a harness set, MLflow and W&B tracking."""
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from dba_ray.config import ModelConfig
    from dba_ray.model import byte_tokenizer, load_model

    tmp = tmp_path_factory.mktemp("pipeline")
    base = tmp / "base"
    load_model(ModelConfig()).save_pretrained(base)
    byte_tokenizer().save_pretrained(base)

    # The generate-until task's answers: the base model's own greedy continuations (by
    # the harness's backend) for the first half of the questions, wrong ones for the
    # rest, so the base model's exact match is 0.5 by construction.
    lm = HFLM(
        pretrained=transformers.AutoModelForCausalLM.from_pretrained(base),
        tokenizer=transformers.AutoTokenizer.from_pretrained(base), batch_size=4,
    )
    reqs = [Instance("generate_until", {}, (f"Q: {q}\nA:", dict(GEN_KWARGS)), i) for i, q in enumerate(QUESTIONS)]
    greedy = lm.generate_until(reqs)
    answers = [g if i < 2 else g + "#not this" for i, g in enumerate(greedy)]
    qa = write_jsonl(tmp / "qa.jsonl", [{"question": q, "answer": a} for q, a in zip(QUESTIONS, answers)])
    mc = write_jsonl(tmp / "mc.jsonl", MC)
    tasks = [
        _task_yaml(tmp / "tiny_mc.yaml", "tiny_mc", mc, output_type="multiple_choice",
                   doc_to_text="{{question}}\nAnswer:", doc_to_choice="{{choices}}", doc_to_target="answer",
                   metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}]),
        _task_yaml(tmp / "tiny_qa.yaml", "tiny_qa", qa, output_type="generate_until",
                   doc_to_text="Q: {{question}}\nA:", doc_to_target="{{answer}}", generation_kwargs=GEN_KWARGS,
                   metric_list=[{"metric": "exact_match"}]),
    ]
    gen = write_jsonl(tmp / "gen.jsonl", make_docs(40, seed=0))
    gen_eval = write_jsonl(tmp / "gen_eval.jsonl", make_docs(8, seed=2))
    dom = write_jsonl(tmp / "dom.jsonl", [{"text": "def f(x):\n    return x + 1"}] * 32)
    tree = {
        "output_dir": str(tmp / "out"),
        "model": {"name_or_path": str(base)},
        "stage1": {"data": {"path": gen, "seq_len": 32}, "batch_size": 8},
        "train": {"data": {"path": dom, "seq_len": 32}, "batch_size": 4, "max_steps": 4,
                  "eval_every": 2, "schedule": {"lr": 3e-3}},
        "eval": {"sets": [
            {"name": "gen", "kind": "general", "data": {"path": gen_eval, "seq_len": 32}},
            {"name": "bench", "kind": "domain", "type": "lm_eval", "tasks": tasks},
        ]},
    }
    cfg_file = tmp / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    assert main(["run", str(cfg_file)]) == 0
    report = json.loads((tmp / "out" / "report.json").read_text())
    return {"tmp": tmp, "cfg_file": cfg_file, "tree": tree, "tasks": tasks, "report": report, "base": str(base)}


def test_harness_scores_match_the_harness_run_directly(pipeline, tmp_path):
    report, tasks = pipeline["report"], pipeline["tasks"]
    base = report["base"]["eval"]["bench"]
    assert base["tiny_qa/exact_match"] == 0.5  # by construction of the answers
    models = {"base": pipeline["base"], **{m: r["model_dir"] for m, r in report["results"].items()}}
    rows = {"base": report["base"], **report["results"]}
    for name, model_dir in models.items():
        direct = _harness_direct(model_dir, tasks)
        got = rows[name]["eval"]["bench"]
        assert got["tiny_mc/acc"] == pytest.approx(direct["tiny_mc"]["acc,none"], abs=1e-9)
        assert got["tiny_mc/acc_norm"] == pytest.approx(direct["tiny_mc"]["acc_norm,none"], abs=1e-9)
        assert got["tiny_qa/exact_match"] == pytest.approx(direct["tiny_qa"]["exact_match,none"], abs=1e-9)
        # Counted metrics: acc_norm for the multiple-choice task, exact_match for the other.
        assert got["acc"] == pytest.approx((got["tiny_mc/acc_norm"] + got["tiny_qa/exact_match"]) / 2)
        assert rows[name]["S_D"] == pytest.approx(got["acc"])  # the only domain set
    direct = report["results"]["direct"]
    assert direct["delta"]["bench"]["acc"] == pytest.approx(direct["eval"]["bench"]["acc"] - base["acc"])
    md = (pipeline["tmp"] / "out" / "report.md").read_text()
    assert "bench acc" in md and f"{direct['eval']['bench']['acc']:.3f}" in md

    # `dba-ray eval` scores the same set on a saved model the same way.
    rc = main(["eval", str(pipeline["cfg_file"]), "--set", f"output_dir={tmp_path}",
               "--set", f"eval.models.tuned={report['results']['dba']['model_dir']}"])
    assert rc == 0
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["base"]["eval"]["bench"] == pytest.approx(base)
    assert scored["results"]["tuned"]["eval"]["bench"] == pytest.approx(report["results"]["dba"]["eval"]["bench"])


def test_missing_harness_task_file_is_one_line(pipeline, tmp_path, capsys):
    tree = json.loads(json.dumps(pipeline["tree"]))
    tree["output_dir"] = str(tmp_path)
    tree["eval"]["sets"][1]["tasks"] = [str(tmp_path / "nope.yaml")]
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    assert main(["eval", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "task file not found" in err and "nope.yaml" in err
