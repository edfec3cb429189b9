"""Local paths and cloud URIs (s3://, gs://) behind one small API, with atomic writes.

Atomicity: a single file is written to a temporary name and renamed (local) or sent as
one upload that only exists once complete (object stores). A directory artifact is
complete only when its ``meta.json`` exists, and that file is always written last; a
local directory is additionally built under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from dba_ray.errors import UserError


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A URI unchanged, a local path made absolute: Ray workers run in other directories."""
    if is_remote(uri):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().absolute())


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), absolute(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid, ValueError, OSError) as e:
        raise UserError(f"cannot open storage URI {uri}: {e}") from None


def join(uri: str, *names: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri, *names)
    return os.path.join(uri, *names)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"file not found: {uri}") from None


def list_files(uri: str) -> list[tuple[str, int]]:
    """All files under ``uri`` (or ``uri`` itself if it is a file), sorted, with sizes.

    Names are returned as full local paths or URIs. Hidden files are skipped.
    """
    uri = absolute(uri)
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"data path not found: {uri}")
    if info.type == pafs.FileType.File:
        return [(uri, info.size)]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(i.path, path) if is_remote(uri) else os.path.relpath(i.path, path)
        if any(part.startswith((".", "_")) for part in Path(rel).parts):
            continue
        out.append((join(uri, rel), i.size))
    return sorted(out)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    # An object-store upload becomes visible only when the stream closes cleanly.
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@contextmanager
def atomic_directory(uri: str, overwrite: bool, marker: str = "meta.json") -> Iterator[str]:
    """Yield a location to fill; on clean exit it becomes ``uri``, complete.

    The caller must write ``marker`` last. If the body raises, nothing is left at
    ``uri`` that has a marker.
    """
    if exists(uri):
        if not overwrite:
            raise UserError(f"{uri} already exists (set overwrite: true to replace it)")
    if is_remote(uri):
        # No directory rename on object stores: un-commit first, then fill in place.
        delete(join(uri, marker))
        yield uri
        return
    final = Path(resolve(uri)[1])
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield str(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_directory(src: str, dst: str, marker: str) -> None:
    """Copy a finished directory (e.g. a saved model) to ``dst``, atomically: ``dst``
    counts as complete only once its ``marker`` file exists."""
    src = absolute(src)
    files = [uri for uri, _ in list_files(src)]
    names = {uri: uri[len(src) :].lstrip("/\\") for uri in files}
    files.sort(key=lambda uri: names[uri] == marker)  # the marker last
    with atomic_directory(dst, overwrite=True, marker=marker) as d:
        for uri in files:
            write_bytes_atomic(join(d, names[uri]), read_bytes(uri))
