"""Image sources split into input shards: IDX (Fashion-MNIST, MNIST), image folders, WebDataset tars, Parquet.

A source is described by a small picklable :class:`SourceSpec`; :func:`open_source` turns it into a
:class:`Source` that lists its :class:`InputShard` s (on the driver) and reads one shard's records (on a
worker). An input shard is the unit of work and of resumption: the pipeline writes exactly one output
file per input shard, so its definition must be stable across re-runs of the same command.

Every record carries a stable, globally unique ``id`` (``SOURCE_NAME/...``), the ``uri`` it came
from, its human ``label`` (-1 when unknown or hidden) and, when the label was hidden on purpose
(``unlabelled_fraction``), the hidden ``true_label`` kept aside for measuring pseudo-label accuracy.
Paths may be local or ``gs://`` URLs (fsspec/gcsfs). One module per format; this one picks the format.
"""
from __future__ import annotations

import dataclasses
import posixpath

from memory import storage
from pipelines.sources.base import InputShard, Record, Source, SourceSpec, is_dir
from pipelines.sources.folder import FolderSource
from pipelines.sources.idx import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, IdxSource, fashion_mnist, idx_paths,
                                   read_idx)
from pipelines.sources.parquet import ParquetSource
from pipelines.sources.webdataset import WebDatasetSource

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "KINDS", "SOURCES", "InputShard", "Record", "Source",
           "SourceSpec", "detect_kind", "fashion_mnist", "open_source", "read_idx", "resolve"]

SOURCES = {"idx": IdxSource, "folder": FolderSource, "webdataset": WebDatasetSource, "parquet": ParquetSource}
KINDS = tuple(SOURCES)


def open_source(spec: SourceSpec) -> Source:
    """A :class:`Source` for a spec (resolved and checked first: a missing path, an unreadable file or a
    missing column fails here, naming it, before any output is written)."""
    spec = resolve(spec)
    source = SOURCES[spec.kind](spec)
    source.check()
    return source


def resolve(spec: SourceSpec) -> SourceSpec:
    """Check the spec at the door; fill in ``kind`` and ``name``. Raises on a missing source."""
    uri = FASHION_MNIST_DIR if spec.uri == "fashion-mnist" else spec.uri.rstrip("/")
    spec.check()
    if not storage.exists(uri):
        raise FileNotFoundError(f"source not found: {spec.uri}")
    kind = detect_kind(uri) if spec.kind == "auto" else spec.kind
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {spec.kind!r}; choose auto or one of {', '.join(KINDS)}")
    if kind == "idx":
        idx_paths(uri, spec.split)  # an unknown split or a split without files fails here, before any output
    elif kind == "folder" and is_dir(uri) and not storage.list_names(uri):
        raise ValueError(f"source {spec.uri} is an empty folder")
    name = spec.name or _default_name(uri, kind)
    return dataclasses.replace(spec, uri=uri, kind=kind, name=name)


def detect_kind(uri: str) -> str:
    """``idx`` for an MNIST-style directory, ``webdataset`` for tars, ``parquet``, else ``folder``."""
    lower = uri.lower()
    if lower.endswith(".tar"):
        return "webdataset"
    if lower.endswith(".parquet"):
        return "parquet"
    if not is_dir(uri):
        raise ValueError(f"cannot tell the kind of source {uri}: a single file must be a .tar or .parquet; "
                         "pass a directory, or --source-kind")
    names = storage.list_names(uri)
    if any(n.endswith(("-images-idx3-ubyte", "-images-idx3-ubyte.gz")) for n in names):
        return "idx"
    if names and all(n.endswith(".tar") for n in names if not n.startswith(".")):
        return "webdataset"
    if names and all(n.endswith(".parquet") for n in names if not n.startswith(".")):
        return "parquet"
    return "folder"


def _default_name(uri: str, kind: str) -> str:
    base = posixpath.basename(uri.rstrip("/"))
    if kind in ("webdataset", "parquet") and "." in base and not is_dir(uri):
        base = posixpath.basename(posixpath.dirname(uri.rstrip("/"))) or base.split(".")[0]
    return base or "source"
