"""Item URIs, the one place that mints and resolves them: where each item's image came from.

The forms, by source kind (memories store these strings, so they never change):

- ``idx``: ``IMAGES_FILE#ROW``, a row of an MNIST-family IDX file (``.../train-images-idx3-ubyte.gz#17``);
- ``folder``: ``PATH``, an image file (of an image folder, or any file or URL);
- ``webdataset``: ``TAR#KEY``, a sample of a WebDataset tar; ``KEY`` is its members' path up to the
  first dot of their name, the image the first member with an image extension (``WDS_IMAGE_EXTS``);
- ``parquet``: ``FILE#ROW``, row ``ROW`` (0-based) of a Parquet file with an image-bytes column.

Paths are local or URLs (``gs://``). :func:`resolve` gives an item's encoded image bytes, or the
pixel array of an IDX row (IDX holds pixels, not files).
"""
from __future__ import annotations

import functools
import posixpath
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq

from memory import storage
from memory.idx import read_idx

KINDS = ("idx", "folder", "webdataset", "parquet")
# WebDataset members that hold the image, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "img")
_IDX = re.compile(r"^(.*idx\d-ubyte(?:\.gz)?)#(\d+)$")


def idx_uri(images_path: str, row: int) -> str:
    return f"{images_path}#{int(row)}"


def folder_uri(root: str, relative: str) -> str:
    return storage.join(root, relative)


def tar_uri(tar_path: str, key: str) -> str:
    return f"{tar_path}#{key}"


def parquet_uri(path: str, row: int) -> str:
    return f"{path}#{int(row)}"


def wds_member(name: str) -> tuple[str, str] | None:
    """``(sample key, lower-case extension)`` of a tar member's name; None for a hidden file."""
    d, base = posixpath.split(name)
    if base.startswith("."):
        return None
    key, _, ext = base.partition(".")
    return posixpath.join(d, key), ext.lower()


def parse(uri: str) -> tuple[str, str, str]:
    """``(kind, path, fragment)`` of a URI; the fragment (row or sample key) is ``""`` for ``folder``."""
    if not uri:
        raise ValueError("an empty uri names no image")
    m = _IDX.match(uri)
    if m:
        return "idx", m.group(1), m.group(2)
    for kind, ext in (("webdataset", ".tar#"), ("parquet", ".parquet#")):
        if ext in uri:
            path, fragment = uri.split(ext, 1)
            return kind, path + ext[:-1], fragment
    return "folder", uri, ""


def resolve(uri: str, *, image_column: str = "image") -> bytes | np.ndarray:
    """The image an item URI names: encoded bytes, or a uint8 pixel array for an IDX row.

    ``image_column`` is the Parquet column holding the images (binary, or a struct with ``bytes``
    as Hugging Face datasets store them).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: an empty URI, or no such row, sample, image member or column.
    """
    kind, path, fragment = parse(uri)
    if kind == "folder":
        return storage.read_bytes(path)
    if kind == "idx":
        images = _idx_array(path)
        row = int(fragment)
        if row >= len(images):
            raise ValueError(f"{uri}: {path} has {len(images)} rows")
        return np.array(images[row])
    if kind == "webdataset":
        return _tar_image(path, fragment)
    if not fragment.isdigit():
        raise ValueError(f"{uri}: {fragment!r} is not a row number")
    return _parquet_image(path, int(fragment), image_column)


@functools.lru_cache(maxsize=4)
def _idx_array(path: str) -> np.ndarray:
    """Read once per process: the items of one IDX file all come from the same array."""
    return read_idx(path)


@functools.lru_cache(maxsize=8)
def _tar_index(path: str) -> dict:
    """``{sample key: {extension: TarInfo}}`` of a tar, read once: its members are then read by offset."""
    fs, p = storage.filesystem(path)
    out: dict = {}
    with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for member in tar:
            named = wds_member(member.name) if member.isfile() else None
            if named:
                out.setdefault(named[0], {})[named[1]] = member
    return out


def _tar_image(path: str, key: str) -> bytes:
    sample = _tar_index(path).get(key)
    if sample is None:
        raise ValueError(f"{path} holds no sample {key!r}")
    ext = next((e for e in WDS_IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"sample {key!r} of {path} has no image member (members: {', '.join(sorted(sample))})")
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        return tar.extractfile(sample[ext]).read()


def _parquet_image(path: str, row: int, column: str) -> bytes:
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        if column not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no image column {column!r} (columns: {', '.join(pf.schema_arrow.names)})")
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row < start + n:
                value = pf.read_row_group(g, columns=[column]).column(0)[row - start].as_py()
                break
            start += n
        else:
            raise ValueError(f"{path}#{row}: the file has {start} rows")
    if isinstance(value, dict):
        value = value.get("bytes")
    if not value:
        raise ValueError(f"{path}#{row} holds no image bytes")
    return value
