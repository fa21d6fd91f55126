"""Staging a build's rows by shard in files, so that no process ever holds more than one input file or one shard.

A runner's shuffle holds what goes through it: the DirectRunner keeps every grouped element in its
driver process (and pushes a whole bundle to one worker), so a build that grouped its rows by shard
held every vector of the memory in one process. Instead, each input file's valid rows are split
by shard and written to staging files (one per file and shard, Parquet); only their paths go
through the shuffle, and the writer of a shard reads its own pieces. The ids for the duplicate
check travel the same way, by bucket. The staging folder,
``shards/vNNNNNNNN.TOKEN/staging/``, sits beside the run's shard folders (so ``vismem gc`` treats
the leftovers of a failed run like its other unfinished folders) and is removed after publishing.
"""
from __future__ import annotations

import hashlib
import io
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import manifest as mf
from memory import storage
from pipelines import validate

STAGING = "staging"


def staging_dir(out: str, version: int, token: str) -> str:
    return storage.join(out, mf.shard_dir(version, STAGING, token=token))


def write_piece(folder: str, part: int, batch: dict) -> str:
    """One batch's rows of shard ``part`` as a staging file (a new name per call: retries never collide)."""
    n = len(batch["ids"])
    files = batch["file"]
    emb = np.ascontiguousarray(batch["embeddings"], dtype=np.float32)
    table = pa.table({
        "file": pa.array(np.full(n, files, dtype=object) if isinstance(files, str) else files, pa.string()),
        "rows": pa.array(batch["rows"], pa.int64()),
        "ids": pa.array(batch["ids"], pa.string()),
        "embeddings": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]),
        "labels": pa.array(batch["labels"], pa.int64()),
        "label_source": pa.array(batch["label_source"], pa.string()),
        "confidence": pa.array(np.asarray(batch["confidence"], np.float32)),
        "source": pa.array(batch["source"], pa.string()),
        "uri": pa.array(batch["uri"], pa.string()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = storage.join(folder, f"part-{part:05d}", f"{uuid.uuid4().hex}.parquet")
    storage.write_bytes_atomic(path, sink.getvalue().to_pybytes())
    return path


def write_ids(folder: str, bucket: int, ids) -> str:
    """One file's (or one shard's) ids of duplicate-check bucket ``bucket`` as a staging file."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": pa.array(np.asarray(ids, dtype=object), pa.string())}), sink)
    path = storage.join(folder, f"ids-{bucket:05d}", f"{uuid.uuid4().hex}.parquet")
    storage.write_bytes_atomic(path, sink.getvalue().to_pybytes())
    return path


def write_sample(folder: str, rows) -> str:
    """k-means training rows (float32, one input file's) as a staging ``.npy`` file. Its name is the
    row count and a hash of the rows: :func:`read_sample` fills one array without a second copy, and
    the sorted hashes put the files in an order that depends on their contents alone, not on paths,
    runners or bundles (a retry rewrites the same file)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    sink = io.BytesIO()
    np.save(sink, rows, allow_pickle=False)
    key = hashlib.blake2b(rows.tobytes(), digest_size=12).hexdigest()
    path = storage.join(folder, "sample", f"{len(rows)}-{key}.npy")
    storage.write_bytes_atomic(path, sink.getvalue())
    return path


def read_sample(paths, dim: int | None = None) -> np.ndarray:
    """The rows of the staging files written by :func:`write_sample` as one array, the files in the
    order of their content hashes (whatever order ``paths`` come in)."""
    named = sorted((p.rstrip("/").rsplit("/", 1)[-1].split("-", 1)[::-1], p) for p in paths)  # [hash, count]
    paths = [p for _, p in named]
    counts = [int(count) for (_, count), _ in named]
    out = None
    at = 0
    for p, n in zip(paths, counts):
        part = np.load(io.BytesIO(storage.read_bytes(p)), allow_pickle=False)
        if out is None:
            out = np.empty((sum(counts), part.shape[1]), np.float32)
        out[at:at + n] = part
        at += n
    return out if out is not None else np.zeros((0, dim or 0), np.float32)


def read_ids(paths) -> np.ndarray:
    """The ids of staging files written by :func:`write_ids`, concatenated (object array)."""
    if not paths:
        return np.zeros(0, dtype=object)
    return np.concatenate([np.asarray(pq.read_table(pa.BufferReader(storage.read_bytes(p))).column("id")
                                      .to_numpy(zero_copy_only=False), dtype=object) for p in paths])


def read_pieces(paths) -> dict:
    """The staged rows of ``paths`` as one batch (``pipelines.validate`` form, ``file`` per row)."""
    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(p))) for p in paths]
    t = pa.concat_tables(tables).combine_chunks()
    emb = t.column("embeddings").combine_chunks()
    out = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names if c != "embeddings"}
    for c in ("file", "ids", "label_source", "source", "uri"):
        out[c] = np.asarray(out[c], dtype=object)
    out["embeddings"] = emb.flatten().to_numpy().reshape(len(t), emb.type.list_size)
    return out


def split_by_shard(batch: dict, part: np.ndarray) -> dict[int, dict]:
    """``{shard: rows of batch}`` by the shard number of each row."""
    return {int(j): validate.take(batch, np.flatnonzero(part == j)) for j in np.unique(part)}


def concat_batches(batches: list) -> dict:
    return batches[0] if len(batches) == 1 else validate.concat(batches)


def remove_staging(out: str, version: int, token: str) -> None:
    storage.remove(staging_dir(out, version, token), recursive=True)

