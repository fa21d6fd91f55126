"""Output paths checked before any work: a file where a file goes, a folder where a folder goes.

A verb that fails only when it writes its result has already spent its run, and a local atomic
write that meets a folder leaves its temporary file behind; these checks make the same mistakes a
one-line error at the door. Local paths are checked up to their first existing parent; ``gs://``
has no folders to trip over, so only the path itself is checked there.
"""
from __future__ import annotations

import os

from memory import storage


def check_file(path: str, what: str = "output") -> None:
    """Raise ValueError unless ``path`` can be written as a file (it may exist: it is replaced).

    Raises:
        ValueError: ``path`` is an existing folder, or a parent of it is an existing file.
    """
    _check_path(path, what)
    fs, p = storage.filesystem(path)
    if fs.isdir(p):
        raise ValueError(f"{what} {path} is a folder; name a file, e.g. {storage.join(path, 'predictions.parquet')}")
    _check_parents(path, what)


def check_folder(path: str, what: str = "output folder") -> None:
    """Raise ValueError unless ``path`` is a folder or can be made one.

    Raises:
        ValueError: ``path`` is an existing file, or a parent of it is an existing file.
    """
    _check_path(path, what)
    fs, p = storage.filesystem(path)
    if fs.exists(p) and not fs.isdir(p):
        raise ValueError(f"{what} {path} is a file; name a folder (it is created if missing)")
    _check_parents(path, what)


def _check_path(path, what: str) -> None:
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} must be a path, got {path!r}")


def _check_parents(path: str, what: str) -> None:
    if storage.is_remote(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"{what} {path} cannot be created: {parent} is a file, not a folder")
