import re
import subprocess
import sys

import pytest

from dba_ray.cli import main
from dba_ray.config import Config, _model_in, load_config, parse_override
from dba_ray.errors import UserError
from dba_ray.reuse import pretrain_plan


def test_yaml_plus_dotted_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("stage1:\n  data:\n    path: /data\n  num_workers: 2\n  max_tokens: 1.5e6\n")
    assert load_config(cfg_file).stage1.max_tokens == 1_500_000  # YAML 1.1 would read a string
    cfg = load_config(cfg_file, ["stage1.max_tokens=2e6", "stage1.data.format=chat"])
    assert cfg.stage1.max_tokens == 2_000_000 and isinstance(cfg.stage1.max_tokens, int)
    assert cfg.stage1.num_workers == 2
    assert cfg.stage1.data.format == "chat"
    assert cfg.stage1_output().endswith("runs/dba/global_gradient")


def test_override_values_are_yaml():
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=1.5e-4") == (["a"], 1.5e-4)
    assert parse_override("a=abc") == (["a"], "abc")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["stage1.max_tokenz=3"], "unknown key 'stage1.max_tokenz' (allowed here: data, max_tokens"),
        (["model.dtype=float8"], "'model.dtype': Input should be 'float32', 'bfloat16' or 'float16'"),
        (["stage1.batch_size=many"], "'stage1.batch_size': Input should be a valid integer"),
        (["stage1.batch_size=0"], "'stage1.batch_size': Input should be greater than or equal to 1"),
        (["stage1.data.seq_len=64"], "'stage1.data': give exactly one of 'path' or 'hf_dataset'"),
        (["nokey"], "not of the form key.path=value"),
    ],
)
def test_bad_config_names_key_and_allowed(overrides, expected):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert expected in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="mapping at the top level"):
        load_config(scalar)


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    """The real console entry point: one line on stderr, exit code 2, no traceback;
    --debug shows the traceback."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("stage1:\n  batch_sise: 3\n")
    cmd = [sys.executable, "-m", "dba_ray", "global-gradient", str(cfg_file)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "unknown key 'stage1.batch_sise'" in lines[0]
    assert "Traceback" not in r.stderr
    r = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_methods_are_names_or_variants_resolved_in_order():
    from dba_ray.methods import config_for_run

    cfg = load_config(
        None,
        [
            "methods=[direct, {name: direct-al, method: direct, set: {schedule.anneal: true}}, mixture]",
            "train.schedule.anneal=true",
        ],
    )
    direct, direct_al, mixture = cfg.methods
    assert (direct.name, direct.method, mixture.method) == ("direct", "direct", "mixture")
    # A baseline forces constant lr; the variant's own `set` comes after and wins.
    assert config_for_run(cfg, direct).train.schedule.anneal is False
    assert config_for_run(cfg, direct_al).train.schedule.anneal is True
    assert config_for_run(cfg, direct).train.dba.ggb is False and config_for_run(cfg, "dba").train.dba.ggb is True
    with pytest.raises(UserError, match="unknown key"):
        config_for_run(cfg, {"name": "x", "method": "dba", "set": {"dba.bost": 3}})
    # Nested overrides merge into the section instead of replacing it.
    nested = config_for_run(
        cfg, {"name": "y", "method": "direct", "set": {"schedule": {"shape": "linear", "lr": 1e-3}}}
    )
    assert nested.train.schedule.shape == "linear" and nested.train.schedule.lr == 1e-3
    assert nested.train.schedule.anneal is False and nested.train.schedule.warmup_ratio == 0.05


@pytest.mark.parametrize(
    ("methods", "expected"),
    [
        ("[dba, dba]", "must be unique"),
        ("[{name: 'a b', method: dba}]", "letters, digits"),
        ("[galore]", "method"),
    ],
)
def test_bad_methods_are_refused(methods, expected):
    with pytest.raises(UserError, match=expected):
        load_config(None, [f"methods={methods}"])


def test_example_configs_are_valid():
    """Every shipped YAML validates; domain.yaml follows the benchmark's verdict: `direct`
    with a merge curve chosen on validation sets carved from its training file (never
    trained on), and AL + the fisher anchor (no GGB) at λ 0.01 with the v_G it needs."""
    from pathlib import Path

    from dba_ray.methods import config_for_run, uses_global_gradient

    examples = Path(__file__).resolve().parent.parent / "examples"
    assert {p.name for p in examples.glob("*.yaml")} >= {"quickstart.yaml", "domain.yaml"}
    for path in examples.glob("*.yaml"):
        load_config(path)
    cfg = load_config(examples / "domain.yaml")
    assert [m.name for m in cfg.methods] == ["direct", "fisher"] and cfg.merge.methods == ["direct"]
    direct = config_for_run(cfg, cfg.methods[0]).train
    assert not direct.schedule.anneal and direct.data.subset == "train"
    domain_val = next(s for s in cfg.eval.validation_sets if s.kind == "domain")
    assert (domain_val.data.path, domain_val.data.subset) == (direct.data.path, "validation")
    t = config_for_run(cfg, cfg.methods[1]).train
    assert (t.dba.ggb, t.dba.dc, t.dba.anchor, t.dba.fisher_lambda, t.schedule.anneal) == (
        False,
        "none",
        "fisher",
        0.01,
        True,
    )
    assert uses_global_gradient(t.dba) and cfg.stage1.second_moment


def test_options_yaml_loads_as_the_defaults_and_names_every_key(tmp_path, capsys):
    assert main(["options", "--yaml"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "all.yaml"
    path.write_text(text)
    assert load_config(path) == Config()

    def missing(model, depth):
        """Keys of ``model`` (and its sections, list entries, sections off by default)
        with no line of their own at their depth, commented out or not."""
        for name, field in model.model_fields.items():
            if not re.search(rf"^{'  ' * depth}(# )?{name}:( |$)", text, re.M):
                yield f"{depth}:{name}"
            nested = _model_in(field.annotation)
            if nested is not None:
                yield from missing(nested, depth + 1)

    assert list(missing(Config, 0)) == []
    assert "# Peak learning rate.\n    lr: 2.0e-05" in text  # a description above its key


def test_pretrain_cache_key_ignores_only_what_leaves_the_weights_alone(tmp_path):
    # A pretraining started without checkpoints, killed, and rerun with them must find
    # the same cache folder (its resumable Train run); a new step count must not.
    def plan(**pretrain):
        tree = {"data": {"path": "gen.jsonl"}, "max_steps": 30, **pretrain}
        return pretrain_plan(Config.model_validate({"output_dir": str(tmp_path), "pretrain": tree}))

    assert plan(checkpoint_every=10)[1] == plan()[1] != plan(max_steps=31)[1]
    assert plan(checkpoint_every=10)[0].train.checkpoint_every == 10
