"""The ``dba-ray`` command line.

User errors (bad config, missing files, malformed data, mismatched artifacts) end with
one line on stderr and exit code 2; ``--debug`` shows the traceback instead.

Each command imports the module that runs it inside its ``cmd_*`` function (or, for
the pipelines, through ``_PIPELINES``): the only imports inside functions outside
optional dependencies, so that ``--help``,
``options`` and a config error answer without loading torch and Ray (tens of seconds
on a busy machine).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from dba_ray import __version__, console
from dba_ray.config import METHODS, MethodSpec, describe_options, load_config, options_yaml
from dba_ray.errors import UserError, find_user_error

log = logging.getLogger("dba_ray")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set stage1.max_tokens=2e6 (repeatable)",
    )


def _add_memory_check_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="start even when the memory plan (dba-ray plan) does not fit the workers' memory",
    )


def _load_config(args, spec: MethodSpec | None = None):
    """The config, checked before any work: writable outputs and, for the commands that
    train, a memory plan that fits (``spec``: the method of ``train``)."""
    cfg = load_config(args.config, args.overrides)  # first: a config error needs no torch or Ray
    from dba_ray import preflight
    from dba_ray.ray_runtime import warn_if_output_in_job_dir

    warn_if_output_in_job_dir(cfg.output_dir)
    if args.command == "global-gradient":
        preflight.writable(cfg.stage1_output(), "stage1.output")
    else:  # every other command with a config writes under output_dir
        preflight.writable(cfg.output_dir, "output_dir")
    if not getattr(args, "skip_memory_check", True):
        preflight.memory(cfg, args.command, spec or _train_spec(cfg, args))
    return cfg


def _train_spec(cfg, args) -> MethodSpec | None:
    """The run `train --method` names: a variant in ``methods``, or a method."""
    if args.command != "train":
        return None
    spec = next((m for m in cfg.methods if m.name == args.method), None)
    if spec is None and args.method not in METHODS:
        names = sorted({*METHODS, *(m.name for m in cfg.methods)})
        raise UserError(f"--method {args.method}: not a method or a name in methods (choose from {', '.join(names)})")
    return spec or MethodSpec(name=args.method, method=args.method)


def cmd_global_gradient(args) -> int:
    from dba_ray import preflight
    from dba_ray.global_gradient import run_global_gradient

    cfg = _load_config(args)
    preflight.check_stage1(cfg)
    result = run_global_gradient(cfg)
    print(f"global gradient written to {result.uri}")
    return 0


def cmd_train(args) -> int:
    from dba_ray import preflight
    from dba_ray.prepare import ensure_base_model
    from dba_ray.trainer import run_train

    cfg = _load_config(args)
    spec = _train_spec(cfg, args)
    preflight.check_train(cfg, spec)
    # A config with a `pretrain` section trains from that (cached) base, as `run` does.
    result = run_train(ensure_base_model(cfg), spec)
    print(f"{args.method}: model saved to {result.model_dir}")
    for key in ("S_D", "S_G", "S"):
        if key in result.metrics:
            print(f"  {key} {result.metrics[key]:.4f}")
    return 0


def cmd_eval(args) -> int:
    from dba_ray import storage
    from dba_ray.report import build_report, write_report
    from dba_ray.scoring import evaluate_models

    cfg = _load_config(args)
    scored = evaluate_models(cfg, {"base": cfg.model.name_or_path, **cfg.eval.models})
    base = scored.pop("base")
    report = build_report(base, scored, {"base_model": cfg.model.name_or_path})
    print(write_report(storage.absolute(cfg.output_dir), report, name="eval"))
    return 0


# Commands that hand their config to one function of one module, imported when the
# command runs (see the module docstring): command -> (module, function).
_PIPELINES = {
    "run": ("dba_ray.run", "run_all"),
    "tune": ("dba_ray.tune", "run_tune"),
    "compare": ("dba_ray.compare", "run_compare"),
    "merge": ("dba_ray.run", "run_merge"),
}


def cmd_pipeline(args) -> int:
    cfg = _load_config(args)  # first: a bad config fails before torch and Ray load
    module, function = _PIPELINES[args.command]
    getattr(importlib.import_module(module), function)(cfg)
    return 0


def _bytes(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        div = {"GiB": 1024**3, "MiB": 1024**2, "KiB": 1024}[unit]
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def cmd_inspect(args) -> int:
    from dba_ray import artifact

    meta = artifact.check_files(args.path)[0] if args.verify else artifact.read_meta(args.path)
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    base = meta["base_model"]
    data = meta["data"]["description"]
    comp = meta.get("compression")
    rows = [
        ("artifact", args.path),
        ("format", f"{meta['kind']} v{meta['format_version']} (dba-ray {meta['dba_ray_version']})"),
        ("created", meta["created_at"]),
        ("base model", f"{base['name_or_path']}" + (f" @ {base['revision']}" if base.get("revision") else "")),
        ("fingerprint", f"{meta['param_fingerprint']} ({meta['num_parameters']:,} parameters)"),
        (
            "data",
            f"{data.get('path') or data.get('hf_dataset')} ({data.get('format')}), fingerprint {meta['data']['fingerprint']}",
        ),
        (
            "seen",
            f"{meta['tokens']:,} tokens, {meta['sequences']:,} sequences of {meta['seq_len']}, {meta['batches']:,} micro-batches",
        ),
        ("mean loss", f"{meta['mean_loss']:.4f}"),
        ("dtype", f"compute {meta['dtype']}, stored {meta.get('save_dtype')}"),
        ("global norm", f"{meta['global_norm']:.6g}"),
        ("second moment", "yes" if meta.get("has_second_moment") else "no"),
        ("compression", f"SVD rank {comp['rank']}, relative error {comp['relative_error']:.4g}" if comp else "none"),
        ("files", ", ".join(f"{f} ({_bytes(i['bytes'])})" for f, i in meta["files"].items())),
    ]
    if meta.get("description"):
        rows.insert(2, ("description", meta["description"]))
    if args.verify:
        rows.append(("verified", "all sha256 checksums match"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("\nper-tensor norms:")
    for name, norm in meta["norms"].items():
        print(f"  {norm:12.6g}  {name}")
    return 0


def cmd_plan(args) -> int:
    from dba_ray import memory_plan, preflight

    cfg = load_config(args.config, args.overrides)
    shape, plan = preflight.memory_phases(cfg, "plan")
    print(memory_plan.report(cfg, shape, plan), end="")
    return 0


def cmd_options(args) -> int:
    print(options_yaml() if args.yaml else "\n".join(describe_options()) + "\n", end="")
    return 0


# The commands that read a config: name, help, what runs it, and whether the memory
# plan is checked before it starts (`--skip-memory-check` then exists).
_CONFIG_COMMANDS = [
    (
        "global-gradient",
        "Stage 1: compute the global gradient of general data at the base weights",
        cmd_global_gradient,
        True,
    ),
    ("train", "Stage 2: fine-tune on the domain data with one method", cmd_train, True),
    ("eval", "score the base model and eval.models on eval.sets", cmd_eval, False),
    ("run", "the pipeline: base model, Stage 1, Stage 2 per method, evaluation, report", cmd_pipeline, True),
    ("tune", "Ray Tune sweep of one method's annealing knobs (ASHA on validation S)", cmd_pipeline, True),
    (
        "compare",
        "every method (× lrs × seeds) and the mixture ratio search on one base and one ĝ_G; report with costs and plots",
        cmd_pipeline,
        True,
    ),
    (
        "merge",
        "merge finished runs back toward the base (merge section): a curve of operating points per run, "
        "scored, the knob chosen on eval.validation_sets and exported",
        cmd_pipeline,
        False,
    ),
    (
        "plan",
        "the memory plan: each phase's peak memory per worker, from the model's shapes (no weights read), "
        "and the fewest workers that fit each GPU size",
        cmd_plan,
        False,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dba-ray",
        description="Domain fine-tuning with Dynamic Boosted Annealing on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"dba-ray {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show what Ray, Ray Data, Ray Train, Ray Tune and Hugging Face print "
        "(execution plans, status tables, progress bars); default: dba-ray's own lines",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_, func, memory_check in _CONFIG_COMMANDS:
        p = sub.add_parser(name, help=help_)
        _add_config_args(p)
        if memory_check:
            _add_memory_check_arg(p)
        p.set_defaults(func=func)
    sub.choices["train"].add_argument(
        "--method",
        default="dba",
        help=f"{', '.join(METHODS)}, or the name of a variant in `methods` (default: dba)",
    )

    p = sub.add_parser("inspect", help="print the metadata of a global-gradient artifact")
    p.add_argument("path", help="artifact directory (local path or s3:// / gs:// URI)")
    p.add_argument("--json", action="store_true", help="print meta.json as it is")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("options", help="list every config option with its default and meaning")
    p.add_argument(
        "--yaml",
        action="store_true",
        help="print a complete YAML config instead: every key at its default, its meaning above it",
    )
    p.set_defaults(func=cmd_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Progress on stdout; warnings and errors, what a user must act on, on stderr.
    progress, problems = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems.setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s dba-ray: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[progress, problems],
    )
    # Before any command imports Ray or transformers; debugging wants every line too.
    console.configure(verbose=args.verbose or args.debug)
    try:
        return args.func(args)
    except Exception as e:
        # Raised in a Ray task, actor, Train worker or Tune trial, a UserError arrives
        # wrapped, its text carrying the remote traceback: the message is unwrapped.
        user = find_user_error(e)
        if user is None or args.debug:
            raise
        print(f"dba-ray: error: {' '.join(str(user).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dba-ray: interrupted", file=sys.stderr)
        return 130
