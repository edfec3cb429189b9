"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import json
import random

import ray


def sized_llama(hidden: int, layers: int) -> dict:
    """`model.builtin_config` for a builtin Llama of the given width and depth."""
    heads = max(1, hidden // 64)
    return {
        "hidden_size": hidden,
        "intermediate_size": hidden * 8 // 3,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
    }


def add_ray_side_args(ap) -> None:
    """The options of a benchmark that sets a Ray Train run beside a plain loop: model
    size, torch threads (both sides), device and dtype, and where the JSON goes."""
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--gpu", action="store_true", help="one GPU worker; model in --dtype")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    ap.add_argument("--address", default=None, help="join this running Ray cluster instead of starting one")


def init_ray(args, num_cpus: int) -> None:
    """Join ``args.address`` (its CPUs are the cluster's), or start a local cluster."""
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False)


def emit(result: dict, out: str | None) -> None:
    """Print the result as JSON, and write it to ``out`` when given."""
    print(json.dumps(result, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def write_text(path, n_docs: int) -> str:
    """Synthetic English-like JSON Lines text at ``path``: for timing, where what the
    tokens say does not change what a step costs."""
    rng = random.Random(0)
    words = "the model reads text and learns which word follows which in a corpus of its own".split()
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))}) + "\n")
    return str(path)
