"""One memory shard: the per-shard writer (used by ``write_memory`` and the Beam build) and reader.

A shard folder holds ``items.parquet`` (row i = index row i, rows sorted by id so exact ties break
by id), ``embeddings.npy`` (the L2-normalised vectors: the exact index, and the source for later
rebuilds) and the backend's own files. Its manifest entry carries every file's checksum.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import numpy as np
import pyarrow.parquet as pq

from memory import schema, storage
from memory.backends import EMBEDDINGS_FILE, backend
from memory.items import ITEMS_FILE, normalise, read_items_at
from memory.manifest import MemoryFormatError, ShardEntry


def write_shard(root: str, path: str, embeddings, ids, labels, *, name: str, backend_name: str,
                partition: int | None = None, weights=None, provenance=None, backend_params=None,
                storage_dtype: str = "float32") -> ShardEntry:
    """Build one shard's index and files, publish them at ``root/path``, return its manifest entry.

    ``path`` is relative to the memory (``memory.manifest.shard_dir``). The caller validates; rows
    are re-ordered by id here. Nothing appears at ``root/path`` until the shard is complete.
    """
    ids = np.asarray(ids, dtype=object)
    order = np.argsort(ids.astype(str), kind="stable")
    ids = ids[order]
    emb = normalise(np.asarray(embeddings)[order], ids=ids)
    labels = np.asarray(labels, dtype=np.int32)[order]
    n = len(ids)
    weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)[order]
    prov = schema.default_provenance(n)
    prov.update({k: np.asarray(v)[order] for k, v in (provenance or {}).items()})
    if backend_name == "exact":
        backend_params = {"dtype": storage_dtype, **(backend_params or {})}
    with tempfile.TemporaryDirectory(prefix="vismem-build-") as tmp:
        pq.write_table(schema.items_table(ids, labels, weights, prov), os.path.join(tmp, ITEMS_FILE))
        np.save(os.path.join(tmp, EMBEDDINGS_FILE), emb.astype(storage_dtype))
        index = backend(backend_name).build(emb, list(ids), backend_params)
        index.save(tmp)
        files = storage.describe_dir(tmp)
        storage.publish_dir(tmp, storage.join(root, path))
    params = getattr(index, "params", None) or backend_params or {}
    return ShardEntry(name=name, path=path, count=n, backend=backend_name, params=params, files=files,
                      partition=partition)


class Shard:
    """A loaded shard: its index plus the item columns that travel with every neighbour."""

    def __init__(self, entry: ShardEntry, local_dir: str):
        self.entry = entry
        self.name = entry.name
        items = read_items_at(local_dir, ["id", "label", "weight"])
        self.ids = np.asarray(items.column("id").to_pylist(), dtype=object)
        self.labels = items.column("label").to_numpy().astype(np.int64)
        self.weights = items.column("weight").to_numpy().astype(np.float32)
        self.index = backend(entry.backend).load(local_dir, entry.params)
        if len(self.index) != len(self.ids) or len(self.ids) != entry.count:
            raise MemoryFormatError(
                f"shard {self.name}: index has {len(self.index)} rows, items table {len(self.ids)}, "
                f"manifest says {entry.count}"
            )
        self.removed = np.zeros(len(self.ids), dtype=bool)  # tombstoned rows (memory.removals)

    def exclude(self, ids) -> int:
        """Mark items removed (by id, never by row): searches skip them. Returns how many matched."""
        ids = set(ids)
        if not ids:
            return int(self.removed.sum())
        self.removed |= np.fromiter((i in ids for i in self.ids), dtype=bool, count=len(self.ids))
        return int(self.removed.sum())

    @property
    def live_count(self) -> int:
        return len(self.ids) - int(self.removed.sum())

    @classmethod
    def open(cls, root: str, entry: ShardEntry, *, verify: bool = True, cache_dir: str | None = None) -> "Shard":
        """Open the shard at ``root/entry.path``, checking that every file is there and intact."""
        with local_shard(root, entry, verify=verify, cache_dir=cache_dir) as local:
            return cls(entry, local)

    def search(self, queries: np.ndarray, k: int, **knobs):
        """``(sims, ids, labels, weights)`` of this shard's top-k live items, best first.

        With removed items the index is asked for more: first ``k`` plus at most ``max(k, 16)``
        extra, doubling for as long as some query kept fewer than ``k`` live items, up to ``k`` plus
        every removed row, which always holds ``k`` live ones. Removed items never come back.
        """
        dead = int(self.removed.sum())
        if dead == 0:
            sims, rows = self.index.search(queries, k, **knobs)
        else:
            n = len(self.ids)
            want = min(k, n - dead)
            fetch = min(n, k + min(dead, max(k, 16)))
            while True:
                sims, rows = self.index.search(queries, fetch, **knobs)
                live = (rows >= 0) & ~self.removed[np.where(rows >= 0, rows, 0)]
                if (live.sum(1) >= want).all() or fetch >= min(n, k + dead):
                    break
                fetch = min(n, k + dead, 2 * fetch)
            first = np.argsort(~live, axis=1, kind="stable")[:, :k]  # live ones, in their order
            live = np.take_along_axis(live, first, 1)
            sims = np.where(live, np.take_along_axis(sims, first, 1), -np.inf).astype(np.float32)
            rows = np.where(live, np.take_along_axis(rows, first, 1), -1)
            if rows.shape[1] < k:
                pad = k - rows.shape[1]
                sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
                rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        valid = rows >= 0
        if valid.all():  # the common case: plain gathers, no masking passes
            return sims, self.ids[rows], self.labels[rows], self.weights[rows]
        safe = np.where(valid, rows, 0)
        ids = np.where(valid, self.ids[safe], "")
        labels = np.where(valid, self.labels[safe], -1)
        weights = np.where(valid, self.weights[safe], 0.0).astype(np.float32)
        return sims, ids, labels, weights


@contextlib.contextmanager
def local_shard(root: str, entry: ShardEntry, files=None, *, verify: bool = True, cache_dir: str | None = None):
    """A local folder holding ``files`` (default: all) of the shard ``entry``, each checked against
    the size (and, with ``verify``, the checksum) its manifest entry records; a download is
    deleted on exit.

    Raises:
        MemoryFormatError: a file missing ("incomplete") or not matching its checksum ("corrupt").
    """
    src = storage.join(root, entry.path)
    files = sorted(entry.files if files is None else files)
    try:
        local = storage.fetch_dir(src, files, cache_root=cache_dir)
    except FileNotFoundError as exc:
        raise MemoryFormatError(f"shard {entry.name} at {src} is incomplete: {exc}") from exc
    try:
        for rel in files:
            path = os.path.join(local, rel)
            if not os.path.exists(path):
                raise MemoryFormatError(f"shard {entry.name} at {src} is incomplete: {rel} is missing")
            want = entry.files[rel]
            if os.path.getsize(path) != want["bytes"] or (verify and storage.sha256_file(path) != want["sha256"]):
                raise MemoryFormatError(f"shard {entry.name} at {src} is corrupt: {rel} does not match its checksum")
        yield local
    finally:
        if storage.is_remote(src):
            shutil.rmtree(local, ignore_errors=True)


def read_vectors(root: str, entry: ShardEntry, rows) -> np.ndarray:
    """Stored (normalised) vectors of ``rows`` of a shard, as float32; local files are memory-mapped."""
    path = storage.join(root, entry.path, EMBEDDINGS_FILE)
    if storage.is_remote(path):
        import io

        emb = np.load(io.BytesIO(storage.read_bytes(path)))
    else:
        emb = np.load(storage.filesystem(path)[1], mmap_mode="r")
    return np.asarray(emb[np.asarray(rows)], dtype=np.float32)
