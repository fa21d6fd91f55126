"""One place for file I/O on local paths and ``gs://`` URLs: atomic writes, uploads, checksums.

Everything goes through fsspec (gcsfs for ``gs://``), so the same code runs on a laptop and on a
cluster. Local writes go to a temporary name and are renamed, so a killed process never leaves a
half-written file under its final name; object stores publish each object whole anyway.
:func:`create_new` is the one write that refuses to replace: what publishing a version rests on.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tempfile
import uuid

import fsspec

# Recent gcsfs probes the bucket type over gRPC, which stalls about a minute per call against an
# emulator; plain HTTP is all a memory needs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem(path: str):
    """``(fs, path_in_fs)`` for a local path or URL."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root


def join(base: str, *parts: str) -> str:
    base = str(base).rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def sha256_file(local_path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(local_path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def describe_dir(local_dir: str) -> dict:
    """``{relative path: {"sha256", "bytes"}}`` for every file under a local directory."""
    out = {}
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            out[rel] = {"sha256": sha256_file(full), "bytes": os.path.getsize(full)}
    return dict(sorted(out.items()))


def write_bytes_atomic(path: str, data: bytes) -> None:
    fs, p = filesystem(path)
    if is_remote(path):
        with fs.open(p, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    tmp = _fsynced_temp(p, data)
    try:
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):  # never leave the temporary file behind
            os.remove(tmp)
        raise


def _fsynced_temp(p: str, data: bytes) -> str:
    """``data`` in a durable temporary file beside local path ``p`` (removed again if writing fails)."""
    tmp = f"{p}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return tmp


def create_new(path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` only if nothing is there: the one atomic step a publish needs.

    Locally the bytes go to a temporary file (fsynced) that is hard-linked to ``path``: the link
    fails when ``path`` exists and never shows a partial file. On ``gs://`` the upload carries
    ``ifGenerationMatch=0``, which Cloud Storage checks atomically (412 when an object exists).

    Raises:
        FileExistsError: ``path`` already exists; nothing was written there.
    """
    fs, p = filesystem(path)
    if is_remote(path):
        # gcsfs sends ifGenerationMatch=0 for mode="create" and maps the 412 to FileExistsError;
        # another fsspec store checks and writes in two steps (not atomic).
        fs.pipe_file(p, data, mode="create")
        return
    folder = os.path.dirname(p) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = _fsynced_temp(p, data)
    try:
        try:
            os.link(tmp, p)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: an exclusive create (partial if killed)
            with open(p, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make a new name in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return f.read()


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def list_names(path: str) -> list[str]:
    """Base names of the entries directly under ``path`` (empty if it does not exist)."""
    fs, p = filesystem(path)
    if not fs.exists(p):
        return []
    fs.invalidate_cache(p)
    return sorted(os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))


def find_files(path: str, suffix: str = "") -> list[str]:
    """Files at ``path``, sorted: every file under a folder (recursively, hidden names left out) or
    every match of a glob, ending in ``suffix``; any other path is returned as it is (its reader
    reports it when missing). Found files keep ``path``'s form: local paths or full URLs."""
    fs, p = filesystem(path)
    if any(ch in p for ch in "*?["):
        proto = path.split("://", 1)[0] + "://" if is_remote(path) else ""
        found = [f if f.startswith(proto) else proto + f for f in fs.glob(p)]
    elif fs.isdir(p):
        fs.invalidate_cache(p)
        rels = (posixpath.relpath(f, p) for f in fs.find(p))
        found = [join(path, r) for r in rels if not any(part.startswith(".") for part in r.split("/"))]
    else:
        return [path]
    return sorted(f for f in found if f.endswith(suffix))


def publish_dir(local_dir: str, dest: str) -> None:
    """Copy a finished local directory to ``dest`` (local or remote) so it appears whole.

    Locally the copy lands under a temporary name and is renamed into place; a directory already at
    ``dest`` is replaced. Remotely each object is uploaded; readers only find the directory through a
    manifest written after this returns.
    """
    fs, p = filesystem(dest)
    if is_remote(dest):
        if fs.exists(p):
            fs.rm(p, recursive=True)
        for rel in describe_dir(local_dir):
            fs.put_file(os.path.join(local_dir, rel), f"{p}/{rel}")
        return
    os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex}"
    shutil.copytree(local_dir, tmp)
    if os.path.exists(p):
        shutil.rmtree(p)
    os.replace(tmp, p)


def clone_dir(src: str, dest: str, files, replaced: dict[str, bytes]) -> None:
    """Make the folder ``dest`` hold ``files`` of the folder ``src`` unchanged and ``replaced`` (``{relative
    path: bytes}``) written anew: a published shard with one file changed, without copying its index.

    Published files are never modified (every write replaces a file by renaming a new one over it), so
    locally the unchanged files are hard links (a copy where the file system has none), and on
    ``gs://`` server-side copies: nothing is downloaded. Locally the folder is assembled under a
    temporary name and renamed into place, so it appears whole; remotely readers only find it through
    a manifest written after this returns.
    """
    fs, s = filesystem(src)
    _, d = filesystem(dest)
    if is_remote(dest):
        for rel in files:
            fs.copy(f"{s}/{rel}", f"{d}/{rel}")
        for rel, data in replaced.items():
            fs.pipe_file(f"{d}/{rel}", data)
        return
    tmp = f"{d}.tmp-{uuid.uuid4().hex}"
    try:
        for rel in files:
            target = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(os.path.join(s, rel), target)
            except OSError:
                shutil.copy2(os.path.join(s, rel), target)
        for rel, data in replaced.items():
            target = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch_dir(src: str, files: list[str], cache_root: str | None = None) -> str:
    """A local directory holding ``files`` of ``src``: ``src`` itself when local, else a download."""
    if not is_remote(src):
        return filesystem(src)[1]
    fs, p = filesystem(src)
    local = tempfile.mkdtemp(prefix="vismem-shard-", dir=cache_root)
    for rel in files:
        target = os.path.join(local, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(f"{p}/{rel}", target)
    return local


def remove(path: str, recursive: bool = False) -> None:
    """Delete a file (or a directory tree with ``recursive``); a missing path is not an error."""
    fs, p = filesystem(path)
    try:
        fs.rm(p, recursive=recursive)
    except FileNotFoundError:
        pass
