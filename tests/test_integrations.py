"""Standard benchmarks (lm-evaluation-harness), experiment tracking (MLflow, W&B) and
model cards, checked on one small `dba-ray run` of two methods over a base model saved
as a Hugging Face model directory. Offline: the harness tasks are YAML files over JSONL
files written here; MLflow is a local file store (and a real `mlflow server` on
127.0.0.1); W&B runs in offline mode."""

from __future__ import annotations

import glob
import importlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from conftest import make_docs, write_jsonl

from dba_ray.cli import main
from dba_ray.curves import STEP_KEYS, read_curves

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _needs(*modules: str) -> None:
    """The dev extras install them (the README's test command): missing is a failure,
    never a skipped test that checked nothing."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"{name} not installed (pip install -e '.[dev]'): {e}")


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
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        **fields,
    }
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _harness_direct(model_dir: str, task_files: list[str]) -> dict:
    """The harness's own numbers for a saved model: its `hf` backend loading the
    directory with AutoModelForCausalLM / AutoTokenizer, as a user would run it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": model_dir, "dtype": "float32"},
        device="cpu",
        tasks=task_files,
        task_manager=TaskManager(include_defaults=False),
        log_samples=False,
    )
    return out["results"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One `dba-ray run` (dba and direct) with a harness set, MLflow and W&B tracking."""
    _needs("lm_eval", "mlflow", "wandb")
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from dba_ray.config import ModelConfig
    from dba_ray.model import load_model
    from dba_ray.tokenizer import byte_tokenizer

    tmp = tmp_path_factory.mktemp("pipeline")
    base = tmp / "base"
    load_model(ModelConfig()).save_pretrained(base)
    byte_tokenizer().save_pretrained(base)

    # The generate-until task's answers: the base model's own greedy continuations (by
    # the harness's backend) for the first half of the questions, wrong ones for the
    # rest, so the base model's exact match is 0.5 by construction.
    lm = HFLM(
        pretrained=transformers.AutoModelForCausalLM.from_pretrained(base),
        tokenizer=transformers.AutoTokenizer.from_pretrained(base),
        batch_size=4,
    )
    reqs = [Instance("generate_until", {}, (f"Q: {q}\nA:", dict(GEN_KWARGS)), i) for i, q in enumerate(QUESTIONS)]
    greedy = lm.generate_until(reqs)
    answers = [g if i < 2 else g + "#not this" for i, g in enumerate(greedy)]
    qa = write_jsonl(tmp / "qa.jsonl", [{"question": q, "answer": a} for q, a in zip(QUESTIONS, answers)])
    mc = write_jsonl(tmp / "mc.jsonl", MC)
    tasks = [
        _task_yaml(
            tmp / "tiny_mc.yaml",
            "tiny_mc",
            mc,
            output_type="multiple_choice",
            doc_to_text="{{question}}\nAnswer:",
            doc_to_choice="{{choices}}",
            doc_to_target="answer",
            metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}],
        ),
        _task_yaml(
            tmp / "tiny_qa.yaml",
            "tiny_qa",
            qa,
            output_type="generate_until",
            doc_to_text="Q: {{question}}\nA:",
            doc_to_target="{{answer}}",
            generation_kwargs=GEN_KWARGS,
            metric_list=[{"metric": "exact_match"}],
        ),
    ]
    gen = write_jsonl(tmp / "gen.jsonl", make_docs(40, seed=0))
    gen_eval = write_jsonl(tmp / "gen_eval.jsonl", make_docs(8, seed=2))
    dom = write_jsonl(tmp / "dom.jsonl", [{"text": "def f(x):\n    return x + 1"}] * 32)
    tree = {
        "output_dir": str(tmp / "out"),
        "model": {"name_or_path": str(base)},
        "stage1": {"data": {"path": gen, "seq_len": 32}, "batch_size": 8},
        "train": {
            "data": {"path": dom, "seq_len": 32},
            "batch_size": 4,
            "max_steps": 4,
            "eval_every": 2,
            "schedule": {"lr": 3e-3},
        },
        "eval": {
            "sets": [
                {"name": "gen", "kind": "general", "data": {"path": gen_eval, "seq_len": 32}},
                {"name": "bench", "kind": "domain", "type": "lm_eval", "tasks": tasks},
            ]
        },
    }
    tree["tracking"] = {
        "mlflow": {"tracking_uri": f"file://{tmp}/mlruns", "experiment": "itest"},
        "wandb": {"project": "itest", "mode": "offline", "dir": str(tmp / "wandb")},
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
    models = {"base": pipeline["base"], "dba": report["results"]["dba"]["model_dir"]}
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
    rc = main(
        [
            "eval",
            str(pipeline["cfg_file"]),
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            f"eval.models.tuned={report['results']['dba']['model_dir']}",
        ]
    )
    assert rc == 0
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["base"]["eval"]["bench"] == pytest.approx(base)
    assert scored["results"]["tuned"]["eval"]["bench"] == pytest.approx(report["results"]["dba"]["eval"]["bench"])


def test_missing_lm_eval_is_one_line_before_any_work(tmp_path):
    """Without lm-eval installed (made unimportable in a fresh interpreter), a config
    with an lm_eval set stops with the install hint, before Ray starts."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "out"),
                "eval": {"sets": [{"name": "b", "kind": "general", "type": "lm_eval", "tasks": ["hellaswag"]}]},
            }
        )
    )
    code = "import sys; sys.modules['lm_eval'] = None; from dba_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "eval", str(cfg_file)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "dba-ray: error: eval set 'b' has type lm_eval, which needs lm-evaluation-harness: "
        "pip install 'dba-ray[lmeval]'"
    )
    assert not (tmp_path / "out").exists()


def test_missing_harness_task_file_is_one_line(pipeline, tmp_path, capsys):
    tree = json.loads(json.dumps(pipeline["tree"]))
    tree["output_dir"] = str(tmp_path)
    tree["eval"]["sets"][1]["tasks"] = [str(tmp_path / "nope.yaml")]
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    assert main(["eval", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dba-ray: error: eval set 'bench': task file not found: {tmp_path / 'nope.yaml'}"


# ---------------------------------------------------------------- tracking


def _mlflow_runs(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _finite_keys(evals: list[dict]) -> list[str]:
    """The evaluation values every in-training evaluation has (S_D is NaN there when
    the only domain set is an lm_eval set, scored on the saved model only)."""
    keys = [k for k in evals[0] if k not in ("kind", "step")]
    found = [k for k in keys if all(isinstance(r.get(k), float) and r[k] == r[k] for r in evals)]
    assert "S_G" in found and "gen/acc" in found
    return found


def _assert_series(got: list, expected: list[tuple[int, float]], key: str) -> None:
    """A tracked metric's (step, value) pairs equal the expected ones: steps exactly,
    values to float tolerance (pytest.approx takes flat sequences only since pytest 9.2)."""
    got = [tuple(pair) for pair in got]
    assert [s for s, _ in got] == [s for s, _ in expected], key
    assert [v for _, v in got] == pytest.approx([v for _, v in expected]), key


def _check_mlflow_stage2(client, run, curves: list[dict], result: dict) -> None:
    """A Stage 2 run's per-step curves and evaluations equal curves.jsonl; its final
    scores equal its row of report.json."""
    train = [r for r in curves if r["kind"] == "train"]
    evals = [r for r in curves if r["kind"] == "eval"]
    assert train and evals
    for key in STEP_KEYS:
        expected = [(r["step"], r[key]) for r in train if key in r]
        if expected:
            got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"train/{key}")]
            _assert_series(sorted(got), expected, key)
    for key in _finite_keys(evals):
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"eval/{key}")]
        _assert_series(sorted(got), [(r["step"], r[key]) for r in evals], key)
    m = run.data.metrics
    for key in ("S_D", "S_G", "S"):
        assert m[f"final/{key}"] == pytest.approx(result[key])
    for name, metrics in result["eval"].items():
        for k, v in metrics.items():
            assert m[f"final/eval/{name}/{k}"] == pytest.approx(v), (name, k)
    assert m["final/tokens"] == result["tokens"] and m["final/steps"] == result["steps"]


def test_mlflow_file_store_has_every_run_grouped(pipeline, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store is opt-in
    report, out = pipeline["report"], pipeline["tmp"] / "out"
    client, runs = _mlflow_runs(f"file://{pipeline['tmp']}/mlruns", "itest")
    assert set(runs) == {"run", "stage1", "dba", "direct"}
    parent = runs["run"]
    group = parent.data.tags["dba_ray.group"]
    for name in ("stage1", "dba", "direct"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[name].data.tags["dba_ray.group"] == group
        assert runs[name].info.status == "FINISHED"
    for method, result in report["results"].items():
        _check_mlflow_stage2(client, runs[method], read_curves(str(out / method)), result)
        assert parent.data.metrics[f"{method}/S"] == pytest.approx(result["S"])
        assert runs[method].data.params["train.schedule.lr"] == "0.003"
    assert parent.data.metrics["base/S"] == pytest.approx(report["base"]["S"])
    meta = json.loads((out / "global_gradient" / "meta.json").read_text())
    assert runs["stage1"].data.metrics["stage1/tokens"] == meta["tokens"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.json"} <= artifacts
    logged = json.loads(open(client.download_artifacts(parent.info.run_id, "report.json")).read())
    assert logged["results"]["dba"]["S"] == report["results"]["dba"]["S"]


def _wandb_records(path: str) -> list:
    """The records of an offline W&B run file: a LevelDB-style log of protobuf records
    (32 KiB blocks, a 7-byte header per fragment) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    records, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too small for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B may split "a/b" into a nested key


def _wandb_runs(root: str) -> dict[str, dict]:
    runs = {}
    for path in glob.glob(os.path.join(root, "wandb", "offline-run-*", "run-*.wandb")):
        run = {"history": {}, "summary": {}, "files": set()}
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run["name"], run["group"] = r.run.display_name, r.run.run_group
            elif kind == "history":
                for item in r.history.item:
                    run["history"].setdefault(_key(item), []).append((r.history.step.num, json.loads(item.value_json)))
            elif kind == "summary":
                run["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
            elif kind == "files":
                run["files"].update(f.path for f in r.files.files)
        runs[run["name"]] = run
    return runs


def test_wandb_offline_runs_match_curves_and_report(pipeline):
    report, out = pipeline["report"], pipeline["tmp"] / "out"
    runs = _wandb_runs(str(pipeline["tmp"] / "wandb"))
    assert set(runs) == {"run", "stage1", "dba", "direct"}
    assert len({r["group"] for r in runs.values()}) == 1
    for method, result in report["results"].items():
        run, curves = runs[method], read_curves(str(out / method))
        for key in STEP_KEYS:
            expected = [(r["step"], r[key]) for r in curves if r["kind"] == "train" and key in r]
            _assert_series(run["history"].get(f"train/{key}", []), expected, key)
        evals = [r for r in curves if r["kind"] == "eval"]
        for key in _finite_keys(evals):
            _assert_series(run["history"][f"eval/{key}"], [(r["step"], r[key]) for r in evals], key)
        for key in ("S_D", "S_G", "S"):
            assert run["summary"][f"final/{key}"] == pytest.approx(result[key])
        assert run["summary"]["final/eval/bench/acc"] == pytest.approx(result["eval"]["bench"]["acc"])
    assert {"report.md", "report.json"} <= runs["run"]["files"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1; the test is skipped if it does not answer
    within 90 s (a loaded CI machine)."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.terminate()
                pytest.fail("mlflow server did not start within 90 s")
            time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_compare_tracked_on_an_mlflow_server(pipeline, mlflow_server, tmp_path):
    """A `compare` is one tracked run holding the report table, its costs and the
    frontier PNG, with its Stage 2 run (a Tune trial) nested under it."""
    tree = json.loads(json.dumps(pipeline["tree"]))
    gen_set = tree["eval"]["sets"][0]
    dom_eval = write_jsonl(tmp_path / "dom_eval.jsonl", [{"text": "def g(y):\n    return y + 1"}] * 4)
    tree["eval"]["sets"] = [gen_set, {"name": "dom", "kind": "domain", "data": {"path": dom_eval, "seq_len": 32}}]
    tree.update(
        output_dir=str(tmp_path / "out"),
        methods=["direct"],
        compare={"max_concurrent": 1},
        tracking={"mlflow": {"tracking_uri": mlflow_server, "experiment": "cmp"}},
    )
    tree["train"]["max_steps"] = 2
    cfg_file = tmp_path / "compare.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    assert main(["compare", str(cfg_file)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    client, runs = _mlflow_runs(mlflow_server, "cmp")
    assert set(runs) == {"compare", "direct"}
    parent, child = runs["compare"], runs["direct"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert {"frontier.png", "report.md", "report.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    row = report["results"]["direct"]
    assert parent.data.metrics["direct/cost/total_tokens"] == row["cost"]["total_tokens"]
    assert parent.data.metrics["direct/S"] == pytest.approx(row["S"])
    _check_mlflow_stage2(client, child, read_curves(os.path.dirname(row["model_dir"])), row)


# ---------------------------------------------------------------- model cards


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_model_cards_name_the_base_and_carry_the_report_scores(pipeline):
    report = pipeline["report"]
    meta = json.loads((pipeline["tmp"] / "out" / "global_gradient" / "meta.json").read_text())
    for method, result in report["results"].items():
        front, body = _front_matter((pipeline["tmp"] / "out" / method / "model" / "README.md").read_text())
        assert front["base_model"] == pipeline["base"]
        assert front["library_name"] == "transformers" and method in front["tags"]
        assert pipeline["tree"]["train"]["data"]["path"] in front["datasets"]
        (entry,) = front["model-index"]
        assert entry["name"] == method
        scored = {r["dataset"]["name"]: {m["name"]: m["value"] for m in r["metrics"]} for r in entry["results"]}
        assert set(scored) == set(result["eval"])
        for name, metrics in result["eval"].items():
            assert scored[name] == pytest.approx(metrics), name
        for key in ("S_D", "S_G", "S"):
            delta = result[key] - report["base"][key]
            assert f"| {key} | {result[key]:.4f} | {report['base'][key]:.4f} | {delta:+.4f} |" in body
        # dba used ĝ_G: the card names the artifact's data fingerprint; direct did not.
        assert (meta["data"]["fingerprint"] in body) == (method == "dba")
