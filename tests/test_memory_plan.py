"""The memory plan (dba_ray/memory_plan.py): its numbers against arithmetic on the
parameters of a real tiny Llama and against the tensors autograd saves, and the
refusal before any work, through the CLI. No Ray: the refusals fire before it starts."""

import os
import subprocess
import sys

import psutil
import pytest
import torch
import yaml
from safetensors import safe_open

from dba_ray import checkpoint, memory_plan
from dba_ray.config import Config
from dba_ray.loss import token_loss_sum
from dba_ray.model import load_empty_model, load_model

GiB = 1024**3
SHARD = 2 * GiB
SMALL = {
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
}


def config(**sections) -> Config:
    tree = {
        "model": {"builtin_config": SMALL},
        "stage1": {"data": {"path": "gen.jsonl", "seq_len": 64}, "batch_size": 4},
        "train": {"data": {"path": "dom.jsonl", "seq_len": 64}, "batch_size": 4},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return Config.model_validate(tree)


def moment(phase, n, layout, name):
    return next(m for m in phase.moments(n, layout) if m.name == name)


def test_stage1_parts_equal_arithmetic_on_the_models_parameters():
    cfg = config(stage1={"second_moment": True, "num_workers": 2})
    real = load_model(cfg.model)
    count = sum(p.numel() for p in real.parameters())
    shape = memory_plan.model_shape(load_empty_model(cfg.model))
    phase = memory_plan.stage1_phase(shape, cfg, SHARD)

    stream = moment(phase, 2, "ddp", "streaming").device
    assert {k: v for k, v in stream.items() if k != "activations"} == {
        "weights": 4 * count,
        "gradient": 4 * count,
        "fp32 gradient sums": 4 * count,
        "fp32 v_G sums": 4 * count,
    }
    end = moment(phase, 2, "ddp", "writing the artifact")
    file = {"artifact file being written (twice)": 2 * 4 * count}
    assert end.host == {"ĝ_G mean": 4 * count, "v_G mean": 4 * count, **file}
    # Stage 1 returns the heap's freed activations to the OS before it reduces and writes.
    assert end.device == {"weights": 4 * count, "fp32 gradient sums": 4 * count, "fp32 v_G sums": 4 * count}

    # fsdp: each rank's rows as torch.chunk splits them (rank 0 holds the most), the root
    # unit (embeddings, final norm, lm_head) gathered, and two blocks.
    for n in (2, 3):
        rows = sum(p.detach().chunk(n)[0].numel() for p in real.parameters())
        root = sum(p.numel() for p in (real.model.embed_tokens.weight, real.model.norm.weight, real.lm_head.weight))
        block = sum(p.numel() for p in real.model.layers[0].parameters())
        sharded = moment(phase, n, "fsdp", "streaming").device
        assert sharded["weights"] == sharded["gradient"] == 4 * rows
        assert sharded["fp32 gradient sums"] == sharded["fp32 v_G sums"] == 4 * rows
        assert sharded["gathered units"] == 4 * (root + 2 * block)


def test_stage2_parts_equal_arithmetic_on_the_models_parameters(tmp_path):
    cfg = config(
        model={"dtype": "bfloat16"},
        train={"dba": {"anchor": "fisher", "boost_mode": "update", "grad_dtype": "bfloat16"}, "num_workers": 2},
    )
    real = load_model(cfg.model)
    count = sum(p.numel() for p in real.parameters())
    shape = memory_plan.model_shape(load_empty_model(cfg.model))
    dba = memory_plan.stage2_phase(shape, cfg, cfg.methods[0])
    step = moment(dba, 2, "ddp", "optimizer step").device
    assert step == {
        "weights": 2 * count,
        "AdamW moments": 2 * 2 * count,
        "ĝ_G": 2 * count,
        "ĝ_G/√v_G (boost_mode update)": 2 * count,
        "anchor: v_G/mean and θ0": (4 + 2) * count,
        "gradients": 2 * count,
        "DDP buckets": 2 * count,
        "AdamW step": 2 * 2 * max(p.numel() for p in real.parameters()),  # CPU: tensor by tensor
        memory_plan.KEPT_HEAP: moment(dba, 2, "ddp", "forward/backward").device["activations"],
    }
    # The checkpoint's CPU copies are what checkpoint.save writes, past AdamW's per-tensor
    # step counts; under fsdp each rank copies its rows.
    optimizer = torch.optim.AdamW(real.parameters())
    real(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    checkpoint.save(str(tmp_path), real, optimizer, 1, {}, 0, 1)
    with safe_open(str(tmp_path / checkpoint.shard_file(0, 1)), "pt") as f:
        written = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith(("model::", "optim::")))
    steps = 4 * len(list(real.parameters()))
    ckpt = moment(dba, 2, "ddp", "checkpoint")
    assert ckpt.host == {"checkpoint copies (weights, AdamW moments)": written - steps}
    assert "gradients" not in ckpt.device
    rows = sum(p.detach().chunk(3)[0].numel() for p in real.parameters())
    assert moment(dba, 3, "fsdp", "checkpoint").host == {"checkpoint copies (weights, AdamW moments)": 3 * 2 * rows}
    lora = memory_plan.stage2_phase(shape, cfg, cfg.methods[1].model_copy(update={"name": "lora", "method": "lora"}))
    adapters = 8 * sum(
        m.in_features + m.out_features
        for name, m in real.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.train.lora.target_modules
    )
    assert moment(lora, 1, "ddp", "optimizer step").device["AdamW moments"] == 2 * 2 * adapters


WRITE_PEAK = """
import resource, psutil, tempfile, torch
from dba_ray import artifact
t = {"w": torch.ones(50_000_000)}
before = psutil.Process().memory_info().rss
with tempfile.TemporaryDirectory() as d:
    artifact.write_parts(d, {"mean_gradient": t})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


def test_writing_an_artifact_file_holds_it_twice_as_planned():
    # In a process of its own, so that its peak RSS is the write's.
    done = subprocess.run([sys.executable, "-c", WRITE_PEAK], capture_output=True, text=True, check=True)
    measured = int(done.stdout) / (4 * 50_000_000)  # in files of the tensor's size
    cfg = config()
    shape = memory_plan.model_shape(load_empty_model(cfg.model))
    end = moment(memory_plan.stage1_phase(shape, cfg, SHARD), 1, "ddp", "writing the artifact")
    assert end.host["artifact file being written (twice)"] == 2 * 4 * shape.params
    assert 1.9 < measured < 2.1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_activations_equal_what_autograd_saves(dtype):
    """The per-layer formula against the bytes of every tensor autograd saves in a real
    forward (parameters excluded): layers, the final norm and log-softmax's output."""
    cfg = config(model={"dtype": dtype})
    model = load_model(cfg.model)
    shape = memory_plan.model_shape(load_empty_model(cfg.model))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, shape.vocab, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model, ids, ids)
    a = 4 if dtype == "float32" else 2
    tokens = ids.numel()
    predicted = tokens * (shape.layers * memory_plan.layer_bytes(shape, a) + (4 + a) * shape.hidden)
    predicted += (tokens - 2) * 4 * shape.vocab  # log-softmax of every position but the last
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.03)


def test_fsdp_stage1_per_worker_falls_with_workers():
    cfg = config(stage1={"parallel": "fsdp", "second_moment": True})
    shape = memory_plan.model_shape(load_empty_model(cfg.model))
    phase = memory_plan.stage1_phase(shape, cfg, SHARD)
    peaks = [sum(moment(phase, n, "fsdp", "streaming").device.values()) for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4
    ddp = sum(moment(phase, 2, "ddp", "streaming").device.values())
    assert peaks[1] < ddp


def test_stage1_checkpoints_and_reading_own_rows(tmp_path):
    # A saved model each fsdp rank reads only its rows of; checkpoints every 1000 tokens.
    folder = tmp_path / "model"
    model = load_model(config().model)
    model.save_pretrained(folder)
    stage1 = {"parallel": "fsdp", "checkpoint_every_tokens": 1000, "second_moment": True}
    cfg = config(model={"name_or_path": str(folder), "tokenizer": "builtin:bytes"}, stage1=stage1)
    shape = memory_plan.model_shape(load_empty_model(cfg.model))
    phase = memory_plan.stage1_phase(shape, cfg, SHARD)
    for n in (2, 3):
        rows = sum(p.detach().chunk(n)[0].numel() for p in model.parameters())
        assert moment(phase, n, "fsdp", "loading its rows").device == {"weights": 4 * rows}
        ckpt = moment(phase, n, "fsdp", "writing a checkpoint")
        assert ckpt.device == {"weights": 4 * rows, "fp32 gradient sums": 4 * rows, "fp32 v_G sums": 4 * rows}
        assert ckpt.host == {"checkpoint copy": 8 * rows, "serialized copy": 8 * rows}
    # The builtin model has no files: every rank loads it whole first.
    builtin = memory_plan.stage1_phase(shape, config(stage1=stage1), SHARD)
    assert [m.name for m in builtin.moments(2, "fsdp")][0] == "loading the model"


def write(tmp_path, tree) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def cli(*args, tmp_path):
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", str(tmp_path))}
    return subprocess.run([sys.executable, "-m", "dba_ray", *args], capture_output=True, text=True, env=env)


# A builtin Llama of about 6.5B parameters: planned on the meta device for free, and
# more than this machine's RAM at Stage 1.
HUGE = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}


@pytest.mark.parametrize("command", ["global-gradient", "run"])
def test_refused_before_any_work_unless_skipped(tmp_path, command):
    out = tmp_path / "out"
    (out / "global_gradient").mkdir(parents=True)  # so that, let through, Stage 1 refuses to replace it
    (tmp_path / "gen.jsonl").write_text('{"text": "general text"}\n')  # readable: preflight reads it
    tree = {
        "output_dir": str(out),
        "model": {"builtin_config": HUGE},
        "stage1": {"data": {"path": str(tmp_path / "gen.jsonl"), "seq_len": 64}},
    }
    cfg = Config.model_validate(tree)
    shape = memory_plan.model_shape(load_empty_model(cfg.model))
    stage1 = memory_plan.stage1_phase(shape, cfg, SHARD)
    per = stage1.peak().device
    ram = psutil.virtual_memory().total
    assert per > ram  # what the test is about
    expected = (
        f"dba-ray: error: memory plan: stage 1 (1 worker(s), ddp) needs {per / GiB:.1f} GiB of RAM per "
        f"process; 1 such process(es) at once and Ray's own need {(per + 2.5 * GiB) / GiB:.1f} GiB, but this "
        f"machine has {ram / GiB:.1f} GiB: use more workers with parallel: fsdp, a smaller batch or "
        "sequence, bigger machines, or --skip-memory-check (see dba-ray plan)\n"
    )
    done = cli(command, write(tmp_path, tree), tmp_path=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", expected)

    # Let through, the command goes on to its next check: here `run` misses its eval
    # sets, and Stage 1 will not replace the folder already at its output.
    done = cli(command, write(tmp_path, tree), "--skip-memory-check", tmp_path=tmp_path)
    after = {
        "run": "dba-ray: error: dba-ray run needs eval.sets (domain and general) to score the methods\n",
        "global-gradient": f"dba-ray: error: {out / 'global_gradient'} already exists "
        "(set stage1.overwrite=true to replace it)\n",
    }[command]
    assert (done.returncode, done.stdout, done.stderr) == (2, "", after)


def test_plan_prints_every_phase(tmp_path):
    tree = {
        "output_dir": str(tmp_path / "out"),
        "model": {"builtin_config": SMALL},
        "stage1": {"data": {"path": "gen.jsonl", "seq_len": 64}, "second_moment": True, "num_workers": 2},
        "train": {"data": {"path": "dom.jsonl", "seq_len": 64}, "num_workers": 2, "parallel": "fsdp"},
        "methods": ["dba"],
    }
    done = cli("plan", write(tmp_path, tree), tmp_path=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == EXPECTED_PLAN


EXPECTED_PLAN = """\
model: LlamaForCausalLM, 0.3M parameters (float32), 3 layers, hidden 96, vocab 262; FSDP units: root 0.1M, 3 blocks of up to 0.1M

peak memory per process, by phase, and what it holds then:
stage 1 (2 worker(s), ddp, CPU): 0.6 GiB of RAM per process at streaming (weights 1 MiB, gradient 1 MiB, fp32 gradient sums 1 MiB, fp32 v_G sums 1 MiB, activations 17 MiB, process 614 MiB)
stage 2 dba (2 worker(s), fsdp, CPU): 0.6 GiB of RAM per process at checkpoint (weights 676 KiB, AdamW moments 1 MiB, ĝ_G 676 KiB, gathered units 966 KiB, freed activations the heap keeps 17 MiB, checkpoint copies (weights, AdamW moments) 2 MiB, process 614 MiB)

smallest worker count that fits, one GPU each (0.5 GiB of it the CUDA context; —: no count fits); a node needs the host RAM per worker times the workers it holds:
phase                          24 GiB   48 GiB   80 GiB  141 GiB  host RAM per worker
stage 1 (ddp)                       1        1        1        1  0.6 GiB
stage 2 dba (fsdp)                  1        1        1        1  0.6 GiB
"""
