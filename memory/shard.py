"""One memory shard: the per-shard writer (used by ``write_memory`` and the Beam build) and reader.

A shard folder holds ``items.parquet`` (row i = index row i, rows sorted by id so exact ties break
by id), ``embeddings.npy`` (+ ``embedding_scales.npy``): the L2-normalised vectors in the memory's
storage mode (:mod:`memory.quantize`; the exact index, and the source for later rebuilds), and the
backend's own files. Its manifest entry carries every file's checksum.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
import threading

import numpy as np
import pyarrow.parquet as pq

from memory import quantize, schema, storage, tuning
from memory.backends import backend
from memory.stored_vectors import (CODEBOOK_FILE, EMBEDDINGS_FILE, SCALES_FILE, load_vectors, read_codebook,
                                   save_vectors, storage_mode, vector_files)
from memory.filters import FIELDS as FILTER_FIELDS
from memory.items import ITEMS_FILE, normalise, read_items_at
from memory.manifest import MemoryFormatError, ShardEntry
from memory.storage import describe_dir, join, publish_dir  # write_shard's `storage` is the mode


DEFAULT_TARGET_RECALL = 0.95
MAX_CACHED_FILTERS = 8  # allowed-row masks a shard keeps (one bool per item each)


def check_target_recall(target) -> float | None:
    """``target`` if it is None (no tuning) or a recall in (0, 1]; a ValueError naming it otherwise."""
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < float(target) <= 1:
        raise ValueError(f"target recall must be a number in (0, 1], got {target!r}")
    return float(target)


def write_shard(root: str, path: str, embeddings, ids, labels, *, name: str, backend_name: str,
                partition: int | None = None, weights=None, provenance=None, backend_params=None,
                storage: str = "float32", target_recall: float | None = DEFAULT_TARGET_RECALL,
                tuning_queries=None) -> ShardEntry:
    """Build one shard's index and files, publish them at ``root/path``, return its manifest entry.

    ``path`` is relative to the memory (``memory.manifest.shard_dir``). The caller validates; rows
    are re-ordered by id here. Nothing appears at ``root/path`` until the shard is complete.
    The vectors are stored once in the ``storage`` mode (:mod:`memory.quantize`), recorded in the
    entry's ``params["storage"]``. With ``target_recall``, a ScaNN tree's search settings are tuned
    to it (:mod:`memory.tuning`; knobs set in ``backend_params`` are kept) and the recall measured
    against brute force is recorded as ``params["recall"]`` (also for quantised exact shards).
    """
    mode = quantize.check_mode(storage, backend_name)
    ids = np.asarray(ids, dtype=object)
    order = np.argsort(ids.astype(str), kind="stable")
    ids = ids[order]
    emb = normalise(np.asarray(embeddings)[order], ids=ids)
    labels = np.asarray(labels, dtype=np.int32)[order]
    n = len(ids)
    weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)[order]
    prov = schema.default_provenance(n)
    prov.update({k: np.asarray(v)[order] for k, v in (provenance or {}).items()})
    fixed = {k: v for k, v in (backend_params or {}).items() if v is not None}
    with tempfile.TemporaryDirectory(prefix="vismem-build-") as tmp:
        pq.write_table(schema.items_table(ids, labels, weights, prov), os.path.join(tmp, ITEMS_FILE))
        stored = quantize.encode(emb, mode)
        save_vectors(tmp, stored)
        if backend_name == "exact":  # the stored copy is the index: no second encoding (pca would fit again)
            index = backend(backend_name).from_stored(stored, {"storage": mode})
        else:
            index = backend(backend_name).build(emb, list(ids), {**fixed, "storage": mode})
        params = dict(getattr(index, "params", None) or {"storage": mode})
        if mode == "codes":
            params["dim"] = emb.shape[1]  # the packed 4-bit copy has ceil(dim / 2) bytes a row
        if target_recall is not None and (backend_name != "exact" or mode != "float32"):
            params.update(_tuned(index, emb, fixed, target_recall, tuning_queries))
            if backend_name != "exact":
                index.params = params  # tuned settings are the index's defaults from now on
        index.save(tmp)
        files = describe_dir(tmp)
        publish_dir(tmp, join(root, path))
    return ShardEntry(name=name, path=path, count=n, backend=backend_name, params=params, files=files,
                      partition=partition)


def _tuned(index, emb, fixed, target, extra) -> dict:
    """:func:`memory.tuning.tune_index` with brute force over the float32 vectors as the truth
    (the blocked kernel reads ``emb`` in place: no second copy of the shard in the worker)."""
    from memory.exact_kernel import BlockedKernel

    kernel = BlockedKernel(emb, 1024, 8192)

    def exact(q, k):
        sims, rows = kernel.topk(q, min(k, len(emb)))
        return np.take_along_axis(rows, np.argsort(-sims, axis=1, kind="stable"), 1)

    return tuning.tune_index(index, emb, exact, target=float(target), fixed=fixed, extra=extra)


def shard_settings(entry: ShardEntry) -> dict:
    """``storage`` and ``target_recall`` of an existing shard, to write its successor the same way."""
    return {"storage": storage_mode(entry.params), "target_recall": entry.params.get("target_recall")}


def shard_vector_files(entry: ShardEntry) -> list[str]:
    """The files of a shard's stored vectors (the rebuild source)."""
    return vector_files(storage_mode(entry.params))


def read_local_vectors(local_dir: str, entry: ShardEntry) -> np.ndarray:
    """Every stored vector of a shard fetched to ``local_dir`` (``local_shard``), decoded to float32 rows."""
    arrays = load_vectors(local_dir)
    mode = storage_mode(entry.params, arrays["vectors"])
    return quantize.decode(arrays, mode, int(entry.params["dim"]) if mode == "codes" else arrays["vectors"].shape[1])


class Shard:
    """A loaded shard: its index plus the item columns that travel with every neighbour."""

    def __init__(self, entry: ShardEntry, local_dir: str, root: str | None = None):
        self.entry = entry
        self.name = entry.name
        self.root = root  # where the items table is read again for filters (None: from local_dir now)
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
        self.dead = 0
        self._filter_columns = None if root is not None else self._read_filter_columns(local_dir)
        self._masks = {}  # ItemFilter -> (rows skipped, allowed share), for the few filters a server sees
        self._masks_lock = threading.Lock()  # a server's requests may filter the same shard at once

    def exclude(self, ids) -> int:
        """Remove items (by id, never by row) from this opened shard; returns how many are removed.

        An index that can delete (ScaNN: ``delete_rows``) drops them from its in-memory searcher,
        so searches never see them again; otherwise searches skip them (:meth:`search`). Each
        :meth:`open` loads its own index from the shard's files, which nothing here changes, so a
        removal never reaches another opened version. Call before searching, not concurrently.
        """
        ids = set(ids)
        if not ids:
            return self.dead
        new = np.fromiter((i in ids for i in self.ids), dtype=bool, count=len(self.ids)) & ~self.removed
        if new.any():
            delete = getattr(self.index, "delete_rows", None)
            if delete is not None:
                delete(np.flatnonzero(new))
            self.removed |= new
            self.dead = int(self.removed.sum())
            self._masks.clear()  # they hold the removed rows too
        return self.dead

    @property
    def live_count(self) -> int:
        return len(self.ids) - self.dead

    @classmethod
    def open(cls, root: str, entry: ShardEntry, *, verify: bool = True, cache_dir: str | None = None) -> "Shard":
        """Open the shard at ``root/entry.path``, checking that every file is there and intact."""
        with local_shard(root, entry, verify=verify, cache_dir=cache_dir) as local:
            return cls(entry, local, root)

    @staticmethod
    def _read_filter_columns(shard_dir: str) -> dict:
        """The filterable provenance columns as (values, codes): a few bytes per item, not a string each."""
        table = read_items_at(shard_dir, FILTER_FIELDS)
        out = {}
        for field in FILTER_FIELDS:
            values, codes = np.unique(np.asarray(table.column(field).to_pylist(), dtype=object).astype(str),
                                      return_inverse=True)
            out[field] = (values, codes.astype(np.min_scalar_type(max(len(values) - 1, 0))))
        return out

    def _filtered(self, where) -> tuple[np.ndarray, float]:
        """For a ``memory.filters.ItemFilter``: the rows a search skips (removed or refused) and the share
        of live rows it allows, computed once per filter. The provenance columns are read on the first
        filtered search only, so memories searched without filters pay nothing."""
        with self._masks_lock:
            found = self._masks.get(where)
            if found is None:
                if self._filter_columns is None:
                    self._filter_columns = self._read_filter_columns(join(self.root, self.entry.path))
                allowed = np.ones(len(self.ids), dtype=bool)
                for field, (values, codes) in self._filter_columns.items():
                    allowed &= where.allowed_values(field, values)[codes]
                live = self.live_count
                found = (self.removed | ~allowed,
                         int(np.count_nonzero(allowed & ~self.removed)) / live if live else 0.0)
                if len(self._masks) >= MAX_CACHED_FILTERS:
                    self._masks.pop(next(iter(self._masks)))
                self._masks[where] = found
            return found

    def _widened(self, knobs: dict, share: float) -> dict:
        """A tree searches ``1/f`` times its leaves when a filter allows a share ``f`` of its live items:
        allowed neighbours are that much sparser in every leaf (10% allowed on 6,000-item trees:
        recall@10 0.89 without, against brute force over the allowed items)."""
        params = getattr(self.index, "params", None) or {}
        if self.entry.backend != "scann" or params.get("brute_force") or "num_leaves" not in params or share <= 0.0:
            return knobs
        base = int(knobs.get("leaves_to_search") or params.get("num_leaves_to_search") or 1)
        return {**knobs, "leaves_to_search": min(int(params["num_leaves"]), math.ceil(base / share))}

    def search_rows(self, queries: np.ndarray, k: int, where=None, **knobs):
        """``(sims (Q, k) float32, rows (Q, k) int64)`` of this shard's top-k live items, best first.

        Removed items never come back, and every query gets ``min(k, live items)`` of them: an
        index that deleted them (:meth:`exclude`) returns only live items itself; otherwise
        :func:`search_live` asks the index for more, for the short queries only. Items a filter
        ``where`` (``memory.filters.ItemFilter``) refuses are skipped the same way, so k allowed
        items come back. Rows past the live items are padding (``-inf``, -1). The memory gathers
        ids once, after its merge.
        """
        if where is not None:
            skipped, share = self._filtered(where)
            return search_live(self.index, skipped, queries, k, self._widened(knobs, share))
        if self.dead == 0 or hasattr(self.index, "delete_rows"):
            return self.index.search(queries, k, **knobs)
        return search_live(self.index, self.removed, queries, k, knobs)

    def take(self, rows: np.ndarray):
        """``(ids, labels, weights)`` of ``rows`` (-1: padding, id '', label -1, weight 0)."""
        valid = rows >= 0
        if valid.all():  # the common case: plain gathers, no masking passes
            return self.ids[rows], self.labels[rows], self.weights[rows]
        safe = np.where(valid, rows, 0)
        return (np.where(valid, self.ids[safe], ""), np.where(valid, self.labels[safe], -1),
                np.where(valid, self.weights[safe], 0.0).astype(np.float32))

    def search(self, queries: np.ndarray, k: int, **knobs):
        """``(sims, ids, labels, weights)`` of this shard's top-k live items, best first."""
        sims, rows = self.search_rows(queries, k, **knobs)
        return (sims, *self.take(rows))

    def use_columns(self, ids: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        """Hold views of a memory's concatenated item columns instead of copies (same values)."""
        if not len(ids) == len(labels) == len(weights) == len(self.ids):
            raise ValueError(f"shard {self.name}: columns of {len(ids)} items given for {len(self.ids)} items")
        self.ids, self.labels, self.weights = ids, labels, weights


# Candidates (queries x fetched) held at once while over-fetching past removed items: 256k entries
# (about 15 MB with the exact index's sort buffers), whatever the number of queries or removed items.
LIVE_SEARCH_BUDGET = 1 << 18


def search_live(index, removed: np.ndarray, queries: np.ndarray, k: int, knobs: dict):
    """``(sims, rows)`` of the top-k rows not in ``removed``, for an index that cannot delete.

    Every query first asks for ``k`` plus at most ``max(k, 16)`` extra; a query left with fewer
    than ``min(k, live)`` live rows asks again for four times as many, up to ``k`` plus every removed
    row (which always holds them). Queries are processed in chunks of at most
    ``LIVE_SEARCH_BUDGET // fetch`` rows, so memory stays bounded at any number of queries and
    removed items. Exact: the index's order (similarity, then row) is kept.
    """
    n, dead = len(removed), int(removed.sum())
    want = min(k, n - dead)
    sims = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    todo, fetch = np.arange(len(queries)), min(n, k + min(dead, max(k, 16)))
    while len(todo):
        short = []
        step = max(1, LIVE_SEARCH_BUDGET // fetch)
        for start in range(0, len(todo), step):
            sel = todo[start:start + step]
            s, r = index.search(queries[sel], fetch, **knobs)
            live = (r >= 0) & ~removed[np.where(r >= 0, r, 0)]
            rank = np.cumsum(live, axis=1)
            done = (rank[:, -1] >= want) | (fetch >= min(n, k + dead))
            hit, col = np.nonzero(live & (rank <= k) & done[:, None])  # row-major: best first
            sims[sel[hit], rank[hit, col] - 1] = s[hit, col]
            rows[sel[hit], rank[hit, col] - 1] = r[hit, col]
            short.append(sel[~done])
        todo, fetch = np.concatenate(short), min(n, k + dead, 4 * fetch)
    return sims, rows


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
    """Stored vectors of ``rows`` of a shard as float32 (int8, codes and pca decoded and re-normalised);
    local files are memory-mapped."""
    rows = np.asarray(rows)
    arrays = {}
    if CODEBOOK_FILE in entry.files:  # read whole: the same for every row
        arrays["codebook"] = read_codebook(io.BytesIO(storage.read_bytes(storage.join(root, entry.path, CODEBOOK_FILE))))
    for key, name in (("vectors", EMBEDDINGS_FILE), ("scales", SCALES_FILE)):
        path = storage.join(root, entry.path, name)
        if name not in entry.files:
            continue
        if storage.is_remote(path):
            arrays[key] = np.load(io.BytesIO(storage.read_bytes(path)))[rows]
        else:
            arrays[key] = np.load(storage.filesystem(path)[1], mmap_mode="r")[rows]
    mode = storage_mode(entry.params, arrays["vectors"])
    dim = int(entry.params["dim"]) if mode == "codes" else arrays["vectors"].shape[1]
    out = quantize.decode(arrays, mode, dim)
    return normalise(out) if mode in ("int8", "codes", "pca") else out
