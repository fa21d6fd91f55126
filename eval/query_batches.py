"""Query embedding shards as a stream of batches: checked from their footers, cut, read a batch at a time.

A batch is up to ``rows`` consecutive rows of one shard (batch ``j`` of a file holds its rows
``[j * rows, (j + 1) * rows)``): a function of the files alone, so a rerun, a worker and the
in-process evaluation cut the same batches and name them alike (:attr:`Batch.key`). Both paths
search each batch's labelled rows in one call: a query's similarities can differ in the last bit
with the other queries of its search call (ScaNN scores queries in blocks of 256, BLAS in tiles), so
the same calls make the same figures.

Everything the door needs comes from the Parquet footers (rows, row groups, dimension, encoder, and
the label column's statistics): a set of queries with no labelled row, labels outside the memory's
classes, another encoder or dimension are refused before any work. :func:`read_batches` reads a
file once, from the row group holding the first batch wanted, with a bounded read buffer: a
reader's memory is a batch and that buffer, whatever the size of the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import storage
from memory.encoder_spec import EncoderSpec, agreed, check_against_memory

READ_BUFFER_BYTES = 1 << 22  # per column chunk being read (pyarrow reads a whole chunk at once without it)


@dataclasses.dataclass(frozen=True)
class QueryFile:
    """One embedding shard as its footer describes it."""

    path: str
    rows: int
    dim: int
    metadata: dict
    label_min: int | None  # None: the footer holds no statistics for the label column
    label_max: int | None
    columns: tuple = ()
    fingerprint: str = ""  # of the footer (row groups, sizes, statistics): another file, another fingerprint


@dataclasses.dataclass(frozen=True)
class Batch:
    """Rows ``[start, stop)`` of file ``file_index`` of a query set (``kind``: ``q`` labelled queries,
    ``ood`` out-of-distribution ones)."""

    kind: str
    file_index: int
    path: str
    index: int
    start: int
    stop: int

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.file_index:05d}-{self.index:06d}"


def describe(files: list[str]) -> list[QueryFile]:
    """Each embedding shard's footer, checked to be one (id, embedding as a fixed-size float list, label).

    Raises:
        ValueError: a file that is not a readable Parquet embedding shard (named).
    """
    out = []
    for path in files:
        fs, p = storage.filesystem(path)
        try:
            with fs.open(p, "rb") as fh:
                pf = pq.ParquetFile(fh)
                schema, md = pf.schema_arrow, pf.metadata
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path} is not a readable Parquet file: {exc}") from None
        missing = [c for c in ("id", "embedding", "label") if c not in schema.names]
        if missing:
            raise ValueError(f"{path}: not an embedding shard, missing column(s) {missing}")
        emb = schema.field("embedding").type
        if not pa.types.is_fixed_size_list(emb) or not pa.types.is_floating(emb.value_type):
            raise ValueError(f"{path}: column 'embedding' must be a fixed-size list of floats, got {emb}")
        lo, hi = _label_range(md)
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        footer = hashlib.sha256(json.dumps(md.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
        out.append(QueryFile(path, md.num_rows, emb.list_size, meta, lo, hi, tuple(schema.names), footer))
    return out


def _label_range(md) -> tuple[int | None, int | None]:
    """The label column's (min, max) over every row group, or (None, None) when any lacks statistics."""
    lo = hi = None
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows == 0:
            continue
        col = next((rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == "label"), None)
        stats = col.statistics if col is not None else None
        if stats is None or not stats.has_min_max or stats.null_count:
            return None, None
        lo = stats.min if lo is None else min(lo, stats.min)
        hi = stats.max if hi is None else max(hi, stats.max)
    return lo, hi


def check(infos: list[QueryFile], manifest, memory: str, path: str, *, what: str = "queries",
          labelled: bool = True) -> None:
    """The checks ``memory.query.read_queries`` makes, from the footers: shards that agree on their
    encoder, the memory's encoder and dimension, at least one row and, with ``labelled``, labels that
    index the memory's classes and at least one labelled row (where the footers carry statistics;
    otherwise the batches are checked as they are read).

    Raises:
        ValueError: any of those, naming the file or the path.
    """
    spec = agreed((f.path, EncoderSpec.from_metadata(f.metadata)) for f in infos)
    check_against_memory(manifest.encoder, spec, memory=memory, inputs_what=f"{what} {path}")
    for f in infos:
        if f.dim != manifest.dim:
            raise ValueError(f"{what} must have shape (n, {manifest.dim}) for memory {memory}, got "
                             f"({f.rows}, {f.dim}) from {f.path}")
    if sum(f.rows for f in infos) == 0:
        raise ValueError(f"{what} {path} hold no rows: nothing to search")
    if not labelled:
        return
    names = manifest.class_names
    for f in infos:
        if f.label_max is not None and f.label_max >= len(names):
            raise ValueError(f"{what} {f.path}: labels reach {f.label_max}, but memory {memory} has {len(names)} "
                             f"classes (labels 0..{len(names) - 1}, -1 unknown): were they numbered for another "
                             "class list?")
    if all(f.rows == 0 or (f.label_max is not None and f.label_max < 0) for f in infos):
        raise ValueError(unlabelled_message(path, infos))


def unlabelled_message(path: str, infos: list[QueryFile]) -> str:
    """The one-line error of a query set without a labelled row, naming its file (or files)."""
    files = [f.path for f in infos]
    where = files[0] if len(files) == 1 else f"{path} ({len(files)} files: {', '.join(files[:3])}" \
        f"{', ...' if len(files) > 3 else ''})"
    return f"{where} has no labelled rows (label >= 0): nothing to evaluate against (every label is -1)"


def plan(infos: list[QueryFile], rows: int, kind: str = "q") -> list[Batch]:
    """Every batch of the files, in order: up to ``rows`` consecutive rows of one file each."""
    return [Batch(kind, i, f.path, j, start, min(start + rows, f.rows))
            for i, f in enumerate(infos) for j, start in enumerate(range(0, f.rows, rows))]


def global_bounds(infos: list[QueryFile], batches: list[Batch]) -> list[tuple[int, int]]:
    """Each batch's rows ``[a, b)`` in the files' rows read one after another (``memory.query.read_queries``)."""
    offsets = np.concatenate([[0], np.cumsum([f.rows for f in infos])]).astype(np.int64)
    return [(int(offsets[b.file_index] + b.start), int(offsets[b.file_index] + b.stop)) for b in batches]


def read_batches(batches: list[Batch], columns=("id", "embedding", "label")):
    """Yield ``(batch, rows)`` for ``batches`` (of one file, ascending, not necessarily adjacent), reading
    the file once from the row group that holds the first; ``rows``: ``ids`` (object), ``embeddings``
    float32 ``(n, dim)`` (as ``memory.schema.read_embeddings`` converts them), ``labels`` int64, and
    any other column asked for, as a list."""
    if not batches:
        return
    path = batches[0].path
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as fh:
        pf = pq.ParquetFile(fh, buffer_size=READ_BUFFER_BYTES)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        first, last = batches[0].start, batches[-1].stop
        groups = [g for g in range(len(sizes)) if starts[g] < last and starts[g + 1] > first]
        pending = iter(batches)
        current, parts, pos = next(pending), [], int(starts[groups[0]])
        step = max(1, min(batches[0].stop - batches[0].start, 1 << 16))
        for rb in pf.iter_batches(batch_size=step, row_groups=groups, columns=list(columns), use_threads=False):
            rb_start, rb_stop = pos, pos + rb.num_rows
            pos = rb_stop
            while current is not None:
                a, b = max(current.start, rb_start), min(current.stop, rb_stop)
                if a < b:
                    parts.append(rb.slice(a - rb_start, b - a))
                if current.stop > rb_stop:
                    break
                yield current, _rows(parts, columns)
                current, parts = next(pending, None), []
            if current is None:
                return
    if current is not None:
        raise ValueError(f"{path} ended before row {current.stop}: the file changed while it was read")


def _rows(parts: list, columns) -> dict:
    table = pa.Table.from_batches(parts)
    col = table.column("embedding").combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False)
    out = {"ids": np.asarray(table.column("id").to_pylist(), dtype=object),
           "embeddings": values.astype(np.float32).reshape(len(table), col.type.list_size),
           "labels": table.column("label").to_numpy().astype(np.int64)}
    for c in columns:
        if c not in ("id", "embedding", "label"):
            out[c] = table.column(c).to_pylist()
    return out


def tasks(batches: list[Batch], per_task: int) -> list[list[Batch]]:
    """``batches`` grouped for workers: up to ``per_task`` of one file in a row, so that a worker reads
    a stretch of a file once rather than a batch at a time."""
    out, current = [], []
    for b in batches:
        if current and (b.path != current[-1].path or b.kind != current[-1].kind or len(current) >= per_task):
            out.append(current)
            current = []
        current.append(b)
    return out + ([current] if current else [])
