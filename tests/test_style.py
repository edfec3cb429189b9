"""The tree is linted and formatted by ruff (settings in pyproject.toml), so the README's
one test command checks style too."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(argv):
    ruff = shutil.which("ruff")
    assert ruff, "ruff not installed (pip install -e '.[dev]')"
    proc = subprocess.run([ruff, *argv, "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
