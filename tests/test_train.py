"""Stage 2 on the real local Ray cluster: DDP against a one-process reference, fault
tolerance, and the guards that stop a run early."""

import math

import numpy as np
import pytest
import torch
from conftest import fail_once_at_step, make_docs, write_jsonl
from transformers import AutoModelForCausalLM

from dba_ray import artifact
from dba_ray.config import Config
from dba_ray.data import build_sequences, collect_arrays
from dba_ray.data.arrays import general_for_mixtures, tokenize_train
from dba_ray.data.order import global_batch_rows, mixture_domain_rows
from dba_ray.dba import DBA, lr_at
from dba_ray.errors import UserError
from dba_ray.global_gradient import run_global_gradient
from dba_ray.loss import token_loss_sum
from dba_ray.methods import config_for_run, uses_global_gradient
from dba_ray.model import load_model
from dba_ray.trainer import run_train

pytestmark = pytest.mark.usefixtures("ray_cluster")


def eval_sets(tmp_path) -> list[dict]:
    """A text set and a choice set, both of an odd size: DDP ranks get unequal shares."""
    text = write_jsonl(tmp_path / "ev_text.jsonl", make_docs(7, seed=4))
    choice = write_jsonl(
        tmp_path / "ev_choice.jsonl",
        [
            {"question": f"q{i} the model", "choices": ["reads text", "the cat", "x"][: 2 + i % 2], "answer": i % 2}
            for i in range(5)
        ],
    )
    return [
        {"name": "text", "kind": "general", "data": {"path": text, "seq_len": 32}},
        {"name": "mc", "kind": "domain", "type": "choice", "data": {"path": choice, "seq_len": 32}},
    ]


def one_process_eval(cfg: Config, model_dir: str) -> dict:
    """The eval sets scored by one process on the saved model."""
    import ray

    from dba_ray.data.arrays import tokenize_eval
    from dba_ray.evaluate import scores, set_metrics, set_sums

    refs, kinds = tokenize_eval(cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = {n: set_metrics(set_sums(model, ray.get(r), 3, torch.device("cpu"))) for n, r in refs.items()}
    return {"eval": out, **scores(out, kinds)}


def assert_same_eval(got: dict, want: dict) -> None:
    assert set(got["eval"]) == set(want["eval"]) == {"text", "mc"}
    for name, metrics in want["eval"].items():
        assert got["eval"][name] == pytest.approx(metrics, rel=1e-5), name
    assert (got["S_D"], got["S_G"]) == pytest.approx((want["S_D"], want["S_G"]), rel=1e-5)


def make_config(tmp_path, out: str, **train) -> Config:
    g = write_jsonl(tmp_path / "general.jsonl", make_docs(60, seed=0))
    d = write_jsonl(tmp_path / "domain.jsonl", make_docs(60, seed=1))
    return Config.model_validate(
        {
            "eval": {"sets": eval_sets(tmp_path), "batch_size": 2},
            "output_dir": str(tmp_path / out),
            "stage1": {
                "data": {"path": g, "seq_len": 32},
                "batch_size": 4,
                "output": str(tmp_path / "gg"),
                "overwrite": True,
            },
            "train": {
                "data": {"path": d, "seq_len": 32},
                "global_gradient": str(tmp_path / "gg"),
                "batch_size": 2,
                "grad_accum": 2,
                "num_workers": 2,
                "max_steps": 6,
                "checkpoint_every": 2,
                "progress_interval_s": 2,
                # T = 6 < boost: γ starts clipped at 1 and decays; DC is active.
                "dba": {"boost": 12, "dc": "norm"},
                "schedule": {"lr": 3e-3, "warmup_ratio": 0.2},
                **train,
            },
        }
    )


def reference_weights(cfg: Config, arrays: dict | None = None, total: int | None = None) -> dict[str, torch.Tensor]:
    """One process, whole global batch at once: the loop Stage 2 distributes. ``cfg`` as
    resolved for the method; ``arrays``: the rows it trains on (default: train.data)."""
    t = cfg.train
    total = total or t.max_steps
    arrays = arrays or collect_arrays(build_sequences(t.data, cfg.model))
    ids = torch.tensor(arrays["input_ids"], dtype=torch.long)
    labels = torch.tensor(arrays["labels"], dtype=torch.long)
    model = load_model(cfg.model)
    model.train()
    dba = None
    if uses_global_gradient(t.dba):
        dba = DBA(model.named_parameters(), artifact.load(t.global_gradient).mean, total, t.dba)
    opt = torch.optim.AdamW(model.parameters(), lr=t.schedule.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    gb = t.batch_size * t.num_workers * t.grad_accum
    for step in range(total):
        rows = global_batch_rows(step, len(ids), gb, len(ids) // gb, t.seed)
        loss, n = token_loss_sum(model, ids[rows], labels[rows])
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        c = dba.apply(step).c if dba else 1.0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, t.schedule) * c
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


def saved_weights(model_dir: str) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {n: p.detach() for n, p in model.named_parameters()}


def rel_error(a, b) -> float:
    num = math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b))
    return num / math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))


@pytest.fixture(scope="module")
def global_gradient(ray_cluster, tmp_path_factory) -> str:
    """ĝ_G of make_config's general data and model, made once for the tests that only
    read it (a Stage 1 run is about 20 s of these 2 cores)."""
    return run_global_gradient(make_config(tmp_path_factory.mktemp("stage1"), "stage1")).uri


def test_ddp_matches_reference_through_a_worker_failure(tmp_path, global_gradient):
    # One run does both jobs: a worker dies after step 3, the group restarts from the
    # step-2 checkpoint, and the result must still be the one-process loop's. A resume
    # that lost the AdamW moments, the DBA state or the data position misses by >1e-3.
    cfg = make_config(tmp_path, "faulty", max_failures=1, global_gradient=global_gradient)
    with fail_once_at_step(3):
        resumed = run_train(cfg, "dba")
    assert (tmp_path / "faulty" / "dba" / "failed_once").exists()  # it did fail
    assert resumed.resumed_at == 2 and resumed.steps == 6 and resumed.tokens > 0
    ref = reference_weights(cfg)
    base = {n: p.detach() for n, p in load_model(cfg.model).named_parameters()}
    assert rel_error(ref, base) > 1e-3  # the run moved the weights
    assert rel_error(saved_weights(resumed.model_dir), ref) < 1e-6
    # Evaluation split over the 2 DDP ranks (odd set sizes) and all-reduced: the scores
    # of one process on the saved model.
    assert_same_eval(resumed.metrics, one_process_eval(cfg, resumed.model_dir))


def test_ddp_run_resumes_on_more_workers(tmp_path):
    """Started on 1 worker, failed after step 3 (no retries); the same run on 2 workers
    with the same global batch resumes from the step-2 checkpoint and ends where one
    process would."""
    one = make_config(tmp_path, "grow", num_workers=1, grad_accum=4)
    one = Config.model_validate({**one.model_dump(), "eval": {}})
    with fail_once_at_step(3), pytest.raises(Exception, match="injected failure at step 3"):
        run_train(one, "direct")
    two = one.model_copy(deep=True)
    two.train.num_workers, two.train.grad_accum = 2, 2
    result = run_train(two, "direct")
    assert result.resumed_at == 2
    assert rel_error(saved_weights(result.model_dir), reference_weights(config_for_run(two, "direct"))) < 1e-6


def test_mixture_trains_on_domain_and_general_rows(tmp_path):
    """The mixture baseline against one process on the domain rows a domain-only run of
    3 steps trains on plus the first round(n·r/(1−r)) general rows: a run that dropped
    the general rows (or took others) would end far from it."""
    cfg = make_config(tmp_path, "mix", num_workers=1, max_steps=3, checkpoint_every=0, mixture={"ratio": 0.25})
    cfg = Config.model_validate({**cfg.model_dump(), "eval": {}})
    result = run_train(cfg, "mixture")
    assert result.steps == 4  # ceil(3 / (1 - 0.25)): equal domain steps
    t = config_for_run(cfg, "mixture").train
    domain = collect_arrays(build_sequences(t.data, cfg.model))
    rows = mixture_domain_rows(t, len(domain["input_ids"]))
    assert len(rows) == 3 * 4 < len(domain["input_ids"])  # 3 steps of 4: not the whole file
    domain = {k: v[rows] for k, v in domain.items()}
    n_general = round(len(rows) * 0.25 / 0.75)
    general = collect_arrays(build_sequences(cfg.stage1.data, cfg.model), limit=n_general)
    assert len(general["input_ids"]) == n_general > 0
    mixed = {k: np.concatenate([domain[k], general[k]]) for k in ("input_ids", "labels")}
    got = saved_weights(result.model_dir)
    assert rel_error(got, reference_weights(config_for_run(cfg, "mixture"), mixed, 4)) < 1e-6
    assert rel_error(got, reference_weights(config_for_run(cfg, "mixture"), domain, 4)) > 1e-3


def test_mixture_general_data_is_sized_by_each_run_own_settings(tmp_path):
    """Shared general data covers the mixture run that needs most, by its own resolved
    steps and ratio (a variant with more steps than cfg.train mixes in more)."""
    import ray

    cfg = make_config(tmp_path, "mixsize", num_workers=1, max_steps=2, mixture={"ratio": 0.25})
    short = config_for_run(cfg, "mixture").train
    long = short.model_copy(update={"max_steps": 5, "mixture": short.mixture.model_copy(update={"ratio": 0.5})})
    train_ref = tokenize_train(cfg)
    n = len(ray.get(train_ref)["input_ids"])
    for trains, want in (([short], round(2 * 4 * 0.25 / 0.75)), ([short, long], 5 * 4)):
        assert len(mixture_domain_rows(trains[-1], n)) < n  # T steps' rows, not the file
        general = ray.get(general_for_mixtures(cfg, train_ref, trains))
        assert len(general["input_ids"]) == want


def test_guards_stop_before_or_during_training(tmp_path, global_gradient):
    cfg = make_config(tmp_path, "guards", num_workers=1, global_gradient=global_gradient)
    other = cfg.model_copy(deep=True)
    other.model.builtin_config = {"hidden_size": 32, "intermediate_size": 64}
    with pytest.raises(UserError, match="does not match"):
        run_train(other, "dba")
    fisher = cfg.model_copy(deep=True)
    fisher.train.dba.anchor = "fisher"
    with pytest.raises(UserError, match="needs v_G"):
        run_train(fisher, "dba")
    nan = cfg.model_copy(deep=True)
    nan.train.schedule.lr = 1e30  # weights overflow fp32 within a step or two
    nan.train.optimizer.grad_clip = None
    with pytest.raises(UserError, match="loss became .* at step"):
        run_train(nan, "direct")


def test_global_gradient_from_the_object_store_and_periodic_eval(tmp_path, global_gradient):
    """ĝ_G handed to Stage 2 as an object in Ray's object store (as `stage1.to_object_store`
    leaves it: test_stage1 makes one), with no disk path for the run to read."""
    import ray

    cfg = make_config(tmp_path, "inmem", num_workers=1, max_steps=4, eval_every=2, checkpoint_every=0)
    ref = ray.put(artifact.load(global_gradient))
    dom_eval = write_jsonl(tmp_path / "dom_eval.jsonl", make_docs(6, seed=3))
    cfg.eval.sets = [{"name": "dom", "kind": "domain", "data": {"path": dom_eval, "seq_len": 32}}]
    cfg = Config.model_validate(cfg.model_dump())
    assert not (tmp_path / "gg").exists()  # train.global_gradient names nothing to read
    result = run_train(cfg, "dba", grad_source=ref)
    # The one-process loop with the same ĝ_G read from disk: the run applied the object.
    on_disk = cfg.model_copy(deep=True)
    on_disk.train.global_gradient = global_gradient
    assert rel_error(saved_weights(result.model_dir), reference_weights(on_disk)) < 1e-6
    assert 0 <= result.metrics["S_D"] <= 1 and "nll" in result.metrics["eval"]["dom"]


def test_run_identity_follows_settings_and_global_gradient(tmp_path):
    """Same settings and ĝ_G: same run (so a re-run resumes); any change: a new run."""
    from dba_ray.config import MethodSpec
    from dba_ray.methods import config_for_run
    from dba_ray.trainer import _settings_digest

    cfg = make_config(tmp_path, "id")
    spec = MethodSpec(name="dba", method="dba")
    first = _settings_digest(config_for_run(cfg, spec), spec, ["t0", "f0", 1.0])
    assert _settings_digest(config_for_run(cfg, spec), spec, ["t0", "f0", 1.0]) == first
    cfg.train.progress_interval_s = 99  # presentation only
    assert _settings_digest(config_for_run(cfg, spec), spec, ["t0", "f0", 1.0]) == first
    assert _settings_digest(config_for_run(cfg, spec), spec, ["t1", "f1", 2.0]) != first  # another ĝ_G
    variant = MethodSpec(name="dba", method="dba", set={"dba.dc": "none"})
    assert _settings_digest(config_for_run(cfg, variant), variant, ["t0", "f0", 1.0]) != first
    # The layout is not the run's identity, the global batch is: a run resumes on
    # another number of workers.
    cfg.train.num_workers, cfg.train.grad_accum, cfg.train.parallel = 1, 4, "fsdp"
    assert _settings_digest(config_for_run(cfg, spec), spec, ["t0", "f0", 1.0]) == first
    cfg.train.grad_accum = 2
    assert _settings_digest(config_for_run(cfg, spec), spec, ["t0", "f0", 1.0]) != first
    cfg.train.grad_accum = 4
    cfg.train.schedule.lr = 1e-4
    assert _settings_digest(config_for_run(cfg, spec), spec, ["t0", "f0", 1.0]) != first


def test_lean_trainer_leaves_out_only_the_helpers_a_run_has_no_use_for():
    # It overrides a private method of Ray Train: when Ray changes it, this fails.
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from dba_ray.ray_runtime import LeanTorchTrainer

    def kinds(trainer) -> list[str]:
        return [type(cb).__name__ for cb in trainer._create_default_callbacks()]

    full = kinds(TorchTrainer(lambda: None))
    datasets, cleaner = DatasetsCallback.__name__, PlacementGroupCleanerCallback.__name__
    assert full.count(datasets) == full.count(cleaner) == 1

    def without(*names: str) -> list[str]:
        return [k for k in full if k not in names]

    assert kinds(LeanTorchTrainer(lambda: None)) == without(datasets, cleaner)  # Stage 2, pretraining
    assert kinds(LeanTorchTrainer(lambda: None, in_tune_trial=True)) == without(datasets)  # a sweep's trial
    assert kinds(LeanTorchTrainer(lambda: None, datasets={"x": object()})) == without(cleaner)  # Stage 1
