"""What reaches the console.

By default: dba-ray's own lines (progress with ETA, one line per phase's end), warnings,
errors and the final tables. ``dba-ray --verbose`` lets through what Ray, Ray Data, Ray
Train, Ray Tune and Hugging Face print on their own. Every switch here is one those
libraries document, but for a filter on two of Tune's log lines that no switch reaches;
several are read when the library is imported, so the CLI calls ``configure`` before it
imports any of them.

Workers' output still reaches the console (``log_to_driver`` stays on): a warning or an
error printed in a worker (a torch warning, a lost node, an OOM kill) is one the user
needs, and the switches below silence the chatter at its source instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

# Read at import, in the driver and in every Ray worker (passed to workers through the
# job's runtime_env by ``worker_env``).
QUIET_ENV = {
    # huggingface_hub's progress bars; transformers' own ("Loading weights") follow it.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Ray Data's loggers: its log file only (dataset plans, INFO lines, failing tasks'
    # tracebacks); our progress lines replace them, and a user error in the data reaches
    # the user as dba-ray's one line.
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
    # Read by the driver's Ray: each worker line as it comes, without the banner Ray
    # appends to the first line it deduplicates. Few lines are left to deduplicate.
    "RAY_DEDUP_LOGS": "0",
    # Read by Tune on the driver: its classic output, which verbose=0 silences whole
    # (the newer one still prints a configuration box and result paths at verbose=0).
    "RAY_AIR_NEW_OUTPUT": "0",
    # Read by Tune on the driver: no traceback when a trial fails; our line names the
    # trial and its error.txt, which keeps the traceback, and the closing error the first error.
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
}


class _TuneLinesOursReplace(logging.Filter):
    """Two lines Ray Tune logs on the driver, which no switch of Tune's turns off: the
    list of trials that did not complete (the closing error counts them), and
    TensorBoard's complaint that a trial's eval history is not a scalar."""

    LOGGERS = {  # logger: the start of the message
        "ray.tune.tune": "Trials did not complete",
        "ray.tune.logger.tensorboardx": "You are trying to log an invalid value",
    }

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.LOGGERS.get(record.name, "\0"))


_TUNE_FILTER = _TuneLinesOursReplace()

_verbose = False


def configure(verbose: bool) -> None:
    """Quiet (default) or verbose, for this command; before Ray or transformers load."""
    global _verbose
    _verbose = verbose
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)  # a user's own setting wins
    for name in _TuneLinesOursReplace.LOGGERS:
        # Once per logger whatever the number of calls (tests call main() many times).
        (logging.getLogger(name).removeFilter if verbose else logging.getLogger(name).addFilter)(_TUNE_FILTER)


def worker_env() -> dict[str, str]:
    """The switches as this process has them, for the job's runtime_env: workers of a
    cluster this command joins do not inherit its environment. Not those a submitted
    job's runtime_env sets already: Ray refuses a variable named in both."""
    taken = worker_env_taken()
    return {key: os.environ[key] for key in QUIET_ENV if key in os.environ and key not in taken}


def worker_env_taken() -> dict[str, str]:
    """The variables a submitted job's runtime_env sets (none outside a job)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return (job.get("runtime_env") or {}).get("env_vars") or {}


def init_options(embedded: bool, gcs: str | None = None) -> dict:
    """ray.init options: the workers' quiet switches, and where Ray Train's helpers find
    the State API: for a cluster this command starts (``embedded``) its dashboard's
    address, for one it joins the GCS address ``gcs`` (host:port, as every node resolves it)."""
    env = worker_env()
    options = {} if _verbose else {"logging_level": logging.WARNING}
    # Ray Train's PlacementGroupCleaner (a Tune trial's runs keep it: LeanTorchTrainer)
    # asks the State API (the dashboard) every second whether its run's controller is
    # alive; with other Ray instances on the machine it cannot tell which is ours and
    # prints a ConnectionError traceback: name ours.
    if embedded:
        port = _free_port()
        options["dashboard_port"] = port
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    elif gcs and "RAY_ADDRESS" not in worker_env_taken():
        env["RAY_ADDRESS"] = gcs  # the State API's address is read from this GCS
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def train_log_level() -> str:
    """Ray Train's own INFO lines (resources requested, worker group started, process
    group set up) stay in its log files unless verbose."""
    return "INFO" if _verbose else "WARNING"


def tune_verbosity() -> int | None:
    """Ray Tune's status table every 30 s: off (0) unless verbose (None: Tune's default);
    dba_ray.trials prints each trial's progress instead."""
    return None if _verbose else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
