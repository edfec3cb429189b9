"""Resumable state kept in the repository: a machine that does not keep OUT between
sessions resumes from a copy of what each finished phase left (``--state``)."""

from __future__ import annotations

import shutil
from pathlib import Path


def carry_state(src: Path, dst: Path, keep: list[str]) -> None:
    """Copy the files matching ``keep`` (glob patterns relative to ``src``) from ``src`` to
    ``dst``, leaving files ``dst`` has."""
    for pattern in keep:
        for f in src.glob(pattern):
            target = dst / f.relative_to(src)
            if f.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
