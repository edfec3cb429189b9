"""Local paths and cloud URIs (s3://, gs://) behind one small API, with atomic writes.

Atomicity: a single file is written to a temporary name and renamed (local) or sent as
one upload that only exists once complete (object stores). A directory is complete only
when its marker file (``meta.json`` for artifacts, ``config.json`` for models) exists,
and that file is always written last; a local directory is additionally built under a
temporary name and renamed into place.

Endpoints and credentials come from the environment (pyarrow's defaults): AWS and GCS
default credentials, and ``AWS_ENDPOINT_URL`` for S3-compatible servers (MinIO, moto).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from dba_ray.errors import UserError

_CHUNK = 16 * 1024**2


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A URI unchanged, a local path made absolute: Ray workers run in other directories."""
    if is_remote(uri):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().absolute())


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
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
    fs, path = filesystem_and_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem_and_path(uri)
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
    fs, path = filesystem_and_path(uri)
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


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _is_full(e: Exception) -> bool:
    # safetensors (Rust) reports a full disk as a SafetensorError whose text carries
    # the OS error number, not as an OSError.
    if isinstance(e, OSError):
        return e.errno in _FULL
    return any(f"(os error {n})" in str(e) for n in _FULL)


class NoSpace(UserError):
    """The disk filled while writing."""


def _no_space(uri: str) -> NoSpace:
    return NoSpace(f"no space left on the device writing {uri}: free some, or write elsewhere")


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = filesystem_and_path(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            if _is_full(e):
                raise _no_space(uri) from None
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    # An object-store upload becomes visible only when the stream closes cleanly.
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete(uri: str) -> None:
    fs, path = filesystem_and_path(uri)
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
        # No directory rename on object stores: un-commit first, then clear what an
        # older version left (stale shards), then fill in place.
        delete(join(uri, marker))
        fs, path = filesystem_and_path(uri)
        fs.delete_dir_contents(path, missing_dir_ok=True)
        yield uri
        return
    final = Path(filesystem_and_path(uri)[1])
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            yield str(tmp)
        except Exception as e:  # the partial copy goes below, like any failed write
            if isinstance(e, NoSpace) or _is_full(e):  # named by the destination, not a temporary
                raise _no_space(uri) from None
            raise
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


@contextmanager
def staged_directory(uri: str, overwrite: bool, marker: str) -> Iterator[str]:
    """Like ``atomic_directory``, but always a local directory to fill, for writers that
    need a real filesystem (``save_pretrained``). A remote ``uri`` is uploaded on clean
    exit under the same protocol, ``marker`` last; if the body raises, nothing is sent."""
    if not is_remote(uri):
        with atomic_directory(uri, overwrite=overwrite, marker=marker) as d:
            yield d
        return
    if exists(uri) and not overwrite:
        raise UserError(f"{uri} already exists (set overwrite: true to replace it)")
    with tempfile.TemporaryDirectory(prefix="dba-ray-upload-") as local:
        yield local
        upload_directory(local, uri, marker)


def upload_directory(local: str, uri: str, marker: str) -> None:
    """Replace the directory at ``uri`` with the files of ``local``, ``marker`` last."""
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names)
    if marker not in files:
        raise ValueError(f"{local} has no {marker}: nothing would mark the upload complete")
    files.sort(key=lambda rel: rel == marker)  # stable sort: only moves the marker last
    with atomic_directory(uri, overwrite=True, marker=marker) as target:
        fs, root = filesystem_and_path(target)
        for rel in files:
            dest = posixpath.join(root, *Path(rel).parts)
            with open(os.path.join(local, rel), "rb") as src, fs.open_output_stream(dest) as dst:
                shutil.copyfileobj(src, dst, _CHUNK)


def local_copy(uri: str, marker: str, skip: tuple[str, ...] = ()) -> str:
    """A local directory with the files of the complete remote directory ``uri`` (one
    holding ``marker``), for readers that need a real directory (``from_pretrained``).

    Copies are cached under ``$XDG_CACHE_HOME/dba-ray/remote`` (default ``~/.cache``),
    keyed by the URI and every file's name, size and modification time, so an unchanged
    directory is downloaded once per machine. Files whose names end in one of ``skip``
    are left out (a separate cache entry). A local path is returned as it is.
    """
    if not is_remote(uri):
        return uri
    fs, root = filesystem_and_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    listing = sorted(
        (posixpath.relpath(i.path, root), i.size, i.mtime_ns)
        for i in infos
        if i.type == pafs.FileType.File and not i.path.endswith(skip)
    )
    if marker not in {name for name, _, _ in listing}:
        raise UserError(f"{uri} is not a complete directory (no {marker}): missing, or an interrupted upload")
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:20]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dba-ray" / "remote"
    final = cache / key
    if (final / marker).exists():
        return str(final)
    tmp = cache / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for name, _, _ in listing:
            dest = tmp.joinpath(*name.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(posixpath.join(root, name)) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process on this machine finished the same copy first.
            if not (final / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def ray_storage(uri: str) -> dict:
    """``RunConfig`` storage arguments for a local path or URI. A remote filesystem is
    resolved here and travels to Ray Train's controller and workers with its settings
    (endpoint included) instead of being resolved again from the URI there."""
    if not is_remote(uri):
        return {"storage_path": absolute(uri)}
    fs, path = filesystem_and_path(uri)
    return {"storage_path": path, "storage_filesystem": fs}


def copy_directory(src: str, dst: str, marker: str) -> None:
    """Copy a finished directory (e.g. a saved model) to ``dst``, atomically: ``dst``
    counts as complete only once its ``marker`` file exists."""
    with staged_directory(dst, overwrite=True, marker=marker) as d:
        shutil.copytree(local_copy(absolute(src), marker), d, dirs_exist_ok=True)
