"""Bad input, as a table: each case ends the command with one line on stderr naming the
thing and what to do, exit code 2, no traceback, and nothing half-written that a later
run would load. Cases that fail before Ray starts run in-process, without a cluster."""

import gzip
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import yaml
from conftest import make_docs, write_jsonl

from dba_ray import artifact
from dba_ray.cli import main


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dba-ray: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_artifact(path, data_path: str) -> dict:
    """A real ĝ_G artifact of the builtin model, as Stage 1 would record it for a config
    whose general data is ``data_path`` (no Ray: the tensors are zeros)."""
    import torch

    from dba_ray.config import Config
    from dba_ray.data import describe_source
    from dba_ray.global_gradient import stage1_settings
    from dba_ray.model import load_empty_model, model_source

    cfg = Config.model_validate({"stage1": {"data": {"path": data_path, "seq_len": 32}}})
    shapes = artifact.parameter_shapes(load_empty_model(cfg.model))
    mean = {n: torch.zeros(s) for n, s in shapes.items()}
    stats = artifact.Stats(
        tokens=1,
        sequences=1,
        batches=1,
        loss_sum=0.0,
        data_fingerprint="0",
        extra={"stage1_settings": stage1_settings(cfg.stage1)},
    )
    meta = artifact.build_meta(
        mean,
        shapes,
        stats,
        base_model=model_source(cfg.model),
        data=describe_source(cfg.stage1.data),
        seq_len=32,
        dtype="float32",
        description="",
        has_second_moment=False,
    )
    artifact.save(str(path), artifact.GlobalGradient(mean=mean, meta=meta))
    return artifact.read_meta(str(path))


def pipeline_tree(tmp_path) -> dict:
    """A `run` / `compare` config on tiny files; nothing in it is wrong."""
    gen = write_jsonl(tmp_path / "gen.jsonl", make_docs(30, seed=0))
    dom = write_jsonl(tmp_path / "dom.jsonl", make_docs(30, seed=1))
    ev = write_jsonl(tmp_path / "ev.jsonl", make_docs(4, seed=2))
    dv = write_jsonl(tmp_path / "dv.jsonl", make_docs(4, seed=3))
    return {
        "output_dir": str(tmp_path / "out"),
        "stage1": {"data": {"path": gen, "seq_len": 32}, "output": str(tmp_path / "shared_gg")},
        "train": {"data": {"path": dom, "seq_len": 32}, "max_steps": 2, "batch_size": 2},
        "eval": {
            "sets": [
                {"name": "ev", "kind": "general", "data": {"path": ev, "seq_len": 32}},
                {"name": "dv", "kind": "domain", "data": {"path": dv, "seq_len": 32}},
            ]
        },
    }


def write_config(tmp_path, tree, name="cfg.yaml") -> str:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(tree))
    return str(f)


@pytest.mark.parametrize("command", ["run", "compare"])
@pytest.mark.parametrize("pretrain", [False, True])
def test_another_configs_global_gradient_is_not_replaced(tmp_path, capsys, command, pretrain):
    """Two configs pointing at one stage1.output: the second must not destroy the first
    one's ĝ_G (it used to, silently). Refused before pretraining or Stage 1 starts."""
    tree = pipeline_tree(tmp_path)
    other = write_jsonl(tmp_path / "other_gen.jsonl", make_docs(30, seed=5))
    made = write_artifact(tmp_path / "shared_gg", other)
    if pretrain:
        tree["pretrain"] = {"data": {"path": tree["stage1"]["data"]["path"], "seq_len": 32}, "max_steps": 2}
    assert main([command, write_config(tmp_path, tree)]) == 2
    line = error_line(capsys)
    what = "base model" if pretrain else "general data"
    assert f"the global gradient at {tmp_path / 'shared_gg'} was made with another {what}" in line
    assert "stage1.overwrite: true" in line
    assert artifact.read_meta(str(tmp_path / "shared_gg")) == made
    assert not (tmp_path / "out").exists()  # nothing started: no pretraining, no Stage 1


# ---------------------------------------------------------------- the table
#
# Each case: (id, command, what to set up, a part of the expected error line). Setup
# functions get tmp_path and the base tree (pipeline_tree) and return the config tree and
# extra command-line words; a tree of None writes the file as the function left it.

# A pre-Ray case that slipped through must not start or join a cluster. The memory plan
# (tested in test_memory_plan.py) joins a configured cluster first, so it is skipped here.
SAFE = ["--skip-memory-check", "--set", "ray.address=127.0.0.1:9"]


def _file(tmp_path, name, data: bytes) -> str:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return str(p)


def raw_config(text):
    def setup(tmp_path, tree):
        (tmp_path / "cfg.yaml").write_text(text)
        return None, []

    return setup


def overrides(*sets):
    def setup(tmp_path, tree):
        return tree, [w for s in sets for w in ("--set", s)]

    return setup


def train_data(make):
    """Domain data made by ``make(tmp_path)`` (a path). `run` reads it (Ray Data, no
    training) before pretraining or Stage 1, so these cases are cheap."""

    def setup(tmp_path, tree):
        tree["train"]["data"]["path"] = make(tmp_path)
        return tree, []

    return setup


def edit(fn):
    """``fn`` edits the tree in place and may return extra command-line words."""

    def setup(tmp_path, tree):
        return tree, fn(tmp_path, tree) or []

    return setup


def _gz_truncated(tmp_path):
    full = gzip.compress("\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(3000)).encode())
    return _file(tmp_path, "data/g.jsonl.gz", full[: len(full) // 2])


def _no_data_files(tmp_path):
    _file(tmp_path, "data/_SUCCESS", b"x")
    _file(tmp_path, "data/.hidden.jsonl", b'{"text": "x"}\n')
    return str(tmp_path / "data")


def _weightless_model(tmp_path, tree):
    from dba_ray.config import ModelConfig
    from dba_ray.model import load_model

    d = tmp_path / "model_without_weights"
    load_model(ModelConfig()).config.save_pretrained(d)
    tree["model"] = {"name_or_path": str(d), "tokenizer": "builtin:bytes"}


def _other_models_gradient(tmp_path, tree):
    write_artifact(tmp_path / "gg_small", tree["stage1"]["data"]["path"])
    tree["model"] = {"builtin_config": {"hidden_size": 32, "intermediate_size": 64}}
    tree["train"]["global_gradient"] = str(tmp_path / "gg_small")


def _fisher_without_v(tmp_path, tree):
    tree["methods"] = [{"name": "anchored", "method": "dba", "set": {"dba.anchor": "fisher"}}]


def _fisher_artifact_without_v(tmp_path, tree):
    write_artifact(tmp_path / "gg_no_v", tree["stage1"]["data"]["path"])
    tree["train"]["global_gradient"] = str(tmp_path / "gg_no_v")
    _fisher_without_v(tmp_path, tree)


def _merge_with_other_models_v(tmp_path, tree):
    _other_models_gradient(tmp_path, tree)
    tree["methods"] = ["direct"]  # no method reads ĝ_G: only the fisher merge does
    tree["merge"] = {"mode": "fisher", "methods": ["direct"]}


def _merge_before_its_base_exists(tmp_path, tree):
    tree["pretrain"] = {"data": {"path": tree["stage1"]["data"]["path"], "seq_len": 32}, "max_steps": 2}
    tree["methods"] = ["direct"]


def _eval_file_missing(tmp_path, tree):
    # With a pretrain section: refused before pretraining starts.
    tree["pretrain"] = {"data": {"path": tree["stage1"]["data"]["path"], "seq_len": 32}, "max_steps": 2}
    tree["eval"]["sets"][0]["data"]["path"] = str(tmp_path / "missing_eval.jsonl")


def _output_under_a_file(tmp_path, tree):
    _file(tmp_path, "a_file", b"x")
    tree["output_dir"] = str(tmp_path / "a_file" / "out")


CASES = [
    # configs
    ("yaml-syntax", "run", raw_config("stage1: [unclosed\n"), "is not valid YAML"),
    ("top-level-list", "run", raw_config("- a\n- b\n"), "must be a mapping at the top level"),
    (
        "unknown-key",
        "run",
        edit(lambda p, t: t["stage1"].update(batch_sise=4)),
        "unknown key 'stage1.batch_sise' (allowed here: data,",
    ),
    (
        "wrong-type",
        "run",
        overrides("stage1.batch_size=four"),
        "'stage1.batch_size': Input should be a valid integer",
    ),
    (
        "negative-size",
        "run",
        overrides("train.batch_size=-2"),
        "'train.batch_size': Input should be greater than or equal to 1",
    ),
    (
        "absurd-seq-len",
        "run",
        overrides("train.data.seq_len=1e9"),
        "train.data.seq_len 1000000000 is longer than the model's context (2048 positions): lower it",
    ),
    (
        "set-names-nothing",
        "run",
        overrides("train.dba.bost=20"),
        "unknown key 'train.dba.bost' (allowed here: ggb, boost,",
    ),
    ("set-without-value", "run", overrides("train.max_steps"), "is not of the form key.path=value"),
    # data (the contents of files: run as a user runs them, in SUBPROCESS_CASES)
    (
        "empty-file",
        "run",
        edit(lambda p, t: t["train"]["data"].update(path=_file(p, "data/e.jsonl", b""))),
        "e.jsonl holds no non-empty data files",
    ),
    (
        "no-data-files",
        "run",
        edit(lambda p, t: t["stage1"]["data"].update(path=_no_data_files(p))),
        "data holds no non-empty data files",
    ),
    (
        "unknown-extension",
        "run",
        edit(lambda p, t: t["train"]["data"].update(path=_file(p, "data/d.csv", b"a,b\n"))),
        "cannot tell the format of",
    ),
    (
        "data-path-missing",
        "run",
        edit(lambda p, t: t["train"]["data"].update(path=str(p / "nowhere.jsonl"))),
        "train.data.path",
    ),
    ("eval-file-missing", "run", edit(_eval_file_missing), "eval set 'ev' data.path"),
    # models
    (
        "model-missing",
        "run",
        overrides("model.name_or_path=/nonexistent/model-dir"),
        "model.name_or_path /nonexistent/model-dir does not exist",
    ),
    ("model-without-weights", "run", edit(_weightless_model), "has a config but no weights"),
    ("gradient-of-another-model", "run", edit(_other_models_gradient), "which does not match"),
    ("merge-v-of-another-model", "run", edit(_merge_with_other_models_v), "which does not match"),
    (
        "merge-before-its-base-exists",
        "merge",
        edit(_merge_before_its_base_exists),
        "the pretrained base model of this config is not in",
    ),
    (
        "fisher-without-v",
        "run",
        edit(_fisher_without_v),
        "anchored uses the fisher anchor or boost_mode update, which need v_G: set stage1.second_moment: true",
    ),
    (
        "fisher-artifact-without-v",
        "run",
        edit(_fisher_artifact_without_v),
        "gg_no_v has none: make it with stage1.second_moment: true",
    ),
    # storage
    ("output-under-a-file", "run", edit(_output_under_a_file), "cannot write to output_dir"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, capsys, case):
    _, command, setup, expected = case
    tree, extra = setup(tmp_path, pipeline_tree(tmp_path))
    cfg = write_config(tmp_path, tree) if tree is not None else str(tmp_path / "cfg.yaml")
    safe = SAFE if command != "merge" else SAFE[1:]  # merge has no memory plan
    assert main([command, cfg, *extra, *safe]) == 2
    assert expected in error_line(capsys)
    assert_nothing_loadable(tmp_path)


# ------------------------------------------------ the table, as a user runs it
#
# Errors in the contents of data files, once raised inside Ray Data: each case runs the
# CLI in a subprocess and its whole stderr must be the one line (exit code 2). Local
# files are read before Ray starts (dba_ray/preflight.py), so these start no cluster:
# SAFE makes one that slipped through fail. Each case: (id, command, setup, the expected
# line's message, "{d}" standing for the data folder). The cases with a pretrain section
# are refused before pretraining.

RECORD_HINT = " (set on_bad_record: skip to skip such records)"


def _lines_then(bad: bytes, name: str):
    """Good JSON Lines records, then ``bad`` as line 3, then more good ones."""
    good = b'{"text": "fine"}\n'
    return train_data(lambda p: _file(p, f"data/{name}", good * 2 + bad + b"\n" + good * 5))


def _mixture_of_malformed(tmp_path, tree):
    # With a pretrain section: refused before pretraining starts. (Too few general
    # sequences for the ratio is not an error: they are cycled, and the report says so.)
    tree["pretrain"] = {"data": {"path": tree["stage1"]["data"]["path"], "seq_len": 32}, "max_steps": 2}
    none = write_jsonl(tmp_path / "data" / "none.jsonl", [{"body": "no text field"}] * 3)
    tree["train"]["mixture"] = {"ratio": 0.5, "data": {"path": none, "seq_len": 32, "on_bad_record": "skip"}}
    tree["methods"] = ["mixture"]


def _stage1_wider_than_the_cluster(tmp_path, tree):
    # Stage 1 asks for every CPU of a 2-CPU embedded cluster: refused from the config
    # alone, before Ray starts and before the pretrain section runs. (The cluster is
    # embedded: ray.address goes back to unset after SAFE's.)
    tree["pretrain"] = {"data": {"path": tree["stage1"]["data"]["path"], "seq_len": 32}, "max_steps": 2}
    tree["ray"] = {"num_cpus": 2}
    tree["stage1"]["num_workers"] = 2
    return ["--set", "ray.address=null"]


def _with_pretrain(tree):
    tree["pretrain"] = {"data": {"path": tree["stage1"]["data"]["path"], "seq_len": 32}, "max_steps": 2}


def _eval_sets_of_one_kind(tmp_path, tree):
    _with_pretrain(tree)
    tree["eval"]["sets"] = tree["eval"]["sets"][:1]


def _validation_sets_of_one_kind(tmp_path, tree):
    _with_pretrain(tree)
    tree["eval"]["validation_sets"] = [
        {**s, "name": f"{s['name']}-val", "kind": "domain"} for s in tree["eval"]["sets"]
    ]


def _stage1_output_under_a_file(tmp_path, tree):
    _with_pretrain(tree)
    tree["stage1"]["output"] = str(Path(_file(tmp_path, "data/a_file", b"x")) / "gg")


def _train_on_another_models_gradient(tmp_path, tree):
    # `train` with a pretrain section: refused before pretraining, not after it.
    _with_pretrain(tree)
    _other_models_gradient(tmp_path, tree)
    return ["--method", "dba"]


SUBPROCESS_CASES = [
    (
        "missing-field",
        "run",
        _lines_then(b'{"body": "no text"}', "m.jsonl"),
        "malformed record at {d}/m.jsonl:3: field 'text' missing or not a string" + RECORD_HINT,
    ),
    (
        "broken-line",
        "run",
        _lines_then(b'{"text": "cut off', "j.jsonl"),
        "malformed record at {d}/j.jsonl:3: not valid JSON (Invalid control character at)" + RECORD_HINT,
    ),
    (
        "empty-record",
        "run",
        _lines_then(b"{}", "e.jsonl"),
        "malformed record at {d}/e.jsonl:3: field 'text' missing or not a string" + RECORD_HINT,
    ),
    (
        "invalid-utf8",
        "run",
        train_data(lambda p: _file(p, "data/u.txt", b"fine\nalso fine\nbad \xff byte\n")),
        "malformed record at {d}/u.txt:3: not valid UTF-8" + RECORD_HINT,
    ),
    (
        "binary-file",
        "run",
        train_data(lambda p: _file(p, "data/b.jsonl", bytes(range(255, -1, -1)) * 40)),
        "malformed record at {d}/b.jsonl:1: not valid UTF-8" + RECORD_HINT,
    ),
    (
        "json-wrong-types",
        "run",
        train_data(lambda p: _file(p, "data/w.json", b'[{"text": 5}]')),
        "malformed record at {d}/w.json: record 0: field 'text' missing or not a string" + RECORD_HINT,
    ),
    (
        "truncated-gz",
        "run",
        train_data(_gz_truncated),
        "cannot read {d}/g.jsonl.gz as jsonl: Truncated compressed stream; a truncated or corrupt file? "
        "Replace it or remove it from the data",
    ),
    (
        "corrupt-parquet",
        "run",
        train_data(lambda p: _file(p, "data/c.parquet", b"PAR1" + bytes(500))),
        "cannot read {d}/c.parquet as parquet: Parquet magic bytes not found in footer. Either the file is "
        "corrupted or this is not a parquet file.; a truncated or corrupt file? Replace it or remove it from the data",
    ),
    (
        "100mb-line",
        "run",
        train_data(lambda p: _file(p, "data/l.jsonl", b'{"text": "' + b"a" * 100 * 2**20 + b'"}\n')),
        "malformed record at {d}/l.jsonl:1: line longer than 16,777,216 characters (split it into smaller records)"
        + RECORD_HINT,
    ),
    (
        "workers-larger-than-the-cluster",
        "run",
        edit(_stage1_wider_than_the_cluster),
        "stage 1: its Train workers need 2 CPUs but the cluster has 2; leave at least one for Ray Data "
        "(raise ray.num_cpus or lower stage1.num_workers / stage1.cpus_per_worker)",
    ),
    (
        "mixture-without-general",
        "run",
        edit(_mixture_of_malformed),
        "train.mixture.data.path {d}/none.jsonl holds no records to use (3 malformed, skipped, the first at "
        "{d}/none.jsonl:1: field 'text' missing or not a string): point it at your data",
    ),
    # what the config and the artifacts tell, before pretraining
    (
        "eval-sets-of-one-kind",
        "run",
        edit(_eval_sets_of_one_kind),
        "eval.sets has no domain set (it holds ev, all general): S = HM(S_D, S_G) needs at least one set "
        "of each kind; add one with kind: domain",
    ),
    (
        "validation-sets-of-one-kind",
        "run",
        edit(_validation_sets_of_one_kind),
        "eval.validation_sets has no general set (it holds ev-val, dv-val, all domain): S = HM(S_D, S_G) "
        "needs at least one set of each kind; add one with kind: general",
    ),
    (
        "stage1-output-under-a-file",
        "run",
        edit(_stage1_output_under_a_file),
        "cannot write to stage1.output {d}/a_file/gg: {d}/a_file is a file; check that it exists and that "
        "you may write there (credentials, permissions), or choose another",
    ),
    (
        "train-on-another-models-gradient",
        "train",
        edit(_train_on_another_models_gradient),
        "global gradient was computed for model 'builtin:tiny-llama' (fingerprint 26693563d5eb079b), which "
        "does not match 'builtin:tiny-llama' (fingerprint 71236058bfab334a); first difference "
        "model.embed_tokens.weight: [262, 32] vs [262, 64]: compute ĝ_G for this model (dba-ray "
        "global-gradient) or point to the artifact made for it",
    ),
]


def run_cli(*words: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dba_ray", *words], capture_output=True, text=True, timeout=900)


def assert_one_error_line(done: subprocess.CompletedProcess, message: str) -> None:
    assert (done.returncode, done.stderr) == (2, f"dba-ray: error: {message}\n"), done.stdout[-3000:]


@pytest.fixture(scope="module")
def user_runs(tmp_path_factory) -> dict:
    """Every case of SUBPROCESS_CASES run as the user would, two at a time: each is one
    process, mostly importing torch and Ray, so the two cores halve the wait."""

    def run(case):
        name, command, setup, _ = case
        tmp_path = tmp_path_factory.mktemp(name)
        tree, extra = setup(tmp_path, pipeline_tree(tmp_path))
        return name, (tmp_path, run_cli(command, write_config(tmp_path, tree), *SAFE, *extra))

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, SUBPROCESS_CASES))


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_bad_data_as_a_user_runs_it(user_runs, case):
    name, _, _, message = case
    tmp_path, done = user_runs[name]
    assert_one_error_line(done, message.format(d=tmp_path / "data"))
    assert_nothing_loadable(tmp_path)
    assert not (tmp_path / "out").exists()  # nothing started: no pretraining, no Stage 1


def test_malformed_record_deep_in_a_large_file(tmp_path, ray_cluster):
    """A file too large to read whole before Ray (its first records are fine): the bad
    record is found by Ray Data, inside a task, and still comes out as the one line. The
    CLI joins this session's cluster rather than starting its own."""
    from dba_ray.preflight import CHECK_BYTES, CHECK_RECORDS

    docs = [json.dumps(d) for d in make_docs(CHECK_RECORDS + 50)]
    bad = CHECK_RECORDS + 20
    docs[bad - 1] = json.dumps({"body": "no text"})
    pad = json.dumps({"text": "x" * 2**16})
    docs += [pad] * (CHECK_BYTES // 2**16 + 1)
    tree = pipeline_tree(tmp_path)
    tree["train"]["data"]["path"] = write_jsonl(tmp_path / "data" / "big.jsonl", docs)
    address = ray.get_runtime_context().gcs_address
    done = run_cli("train", write_config(tmp_path, tree), "--method", "direct", "--set", f"ray.address={address}")
    assert_one_error_line(
        done,
        f"malformed record at {tmp_path / 'data' / 'big.jsonl'}:{bad}: field 'text' missing or not a string"
        + RECORD_HINT,
    )


def assert_nothing_loadable(tmp_path):
    """No complete artifact or model (their markers) and no temporary leftovers."""
    for where in (tmp_path / "out", tmp_path / "shared_gg"):
        if where.exists():
            names = [p.name for p in where.rglob("*")]
            assert not [n for n in names if n in ("meta.json", "config.json") or ".tmp-" in n], names


def make_bucket(s3_env, name: str) -> str:
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


def test_bucket_that_does_not_exist(tmp_path, capsys, s3_env):
    tree = pipeline_tree(tmp_path)
    tree["output_dir"] = "s3://no-such-bucket-14/run"
    assert main(["run", write_config(tmp_path, tree), *SAFE]) == 2
    line = error_line(capsys)
    assert "cannot write to output_dir s3://no-such-bucket-14/run: bucket no-such-bucket-14 does not exist" in line


def test_credentials_refused_by_the_s3_server(tmp_path, capsys, s3_env):
    from moto.core.authorization import enable_iam_authentication

    bucket = make_bucket(s3_env, "guarded-14")
    tree = pipeline_tree(tmp_path)
    tree["output_dir"] = f"{bucket}/run"
    # The local server now checks every request's signature against its IAM users, of
    # which there are none: the environment's keys are refused, as a wrong key would be.
    with enable_iam_authentication():
        assert main(["run", write_config(tmp_path, tree), *SAFE]) == 2
    line = error_line(capsys)
    assert f"cannot write to output_dir {bucket}/run: AWS Error ACCESS_DENIED" in line


def mount_tmpfs(path, options: str):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'})")
    return path


@pytest.fixture
def small_disk(tmp_path):
    path = mount_tmpfs(tmp_path / "disk", "size=512k")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def read_only_disk(tmp_path):
    path = mount_tmpfs(tmp_path / "ro", "size=64k,ro")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_read_only_output_dir(tmp_path, capsys, read_only_disk):
    tree = pipeline_tree(tmp_path)
    tree["output_dir"] = str(read_only_disk / "out")
    assert main(["run", write_config(tmp_path, tree), *SAFE]) == 2
    assert f"cannot write to output_dir {read_only_disk / 'out'}: [Errno 30] Read-only file system" in error_line(
        capsys
    )


@pytest.mark.usefixtures("ray_cluster")
def test_full_disk_leaves_no_partial_artifact(tmp_path, capsys, small_disk):
    """ĝ_G of the builtin model (3.4 MB) on a 512 KiB disk: refused once full, and the
    partial copy is gone."""
    tree = pipeline_tree(tmp_path)
    tree["stage1"]["output"] = str(small_disk / "gg")
    tree["stage1"]["max_tokens"] = 64
    assert main(["global-gradient", write_config(tmp_path, tree)]) == 2
    assert f"no space left on the device writing {small_disk / 'gg'}: free some, or write elsewhere" in error_line(
        capsys
    )
    assert os.listdir(small_disk) == []


def test_exit_code_and_traceback_contract(tmp_path, capsys):
    """As a user runs it: exit code 2 and one line on stderr; --debug adds the traceback."""
    cfg = write_config(tmp_path, {"stage1": {"batch_sise": 4}})
    done = subprocess.run([sys.executable, "-m", "dba_ray", "global-gradient", cfg], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"dba-ray: error: invalid config {cfg}: unknown key 'stage1.batch_sise' (allowed here: "
        + ", ".join(__import__("dba_ray.config").config.Stage1Config.model_fields)
        + ")"
    ]
    from dba_ray.errors import UserError

    with pytest.raises(UserError, match="unknown key 'stage1.batch_sise'"):
        main(["--debug", "global-gradient", cfg])
