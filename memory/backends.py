"""Index backends: exact (blocked matrix product + top-k) and ScaNN, behind one small interface.

Interface (see :class:`Index`): ``build(embeddings, docids, params)`` and ``load(directory)``
construct one; ``search(queries, k)`` returns ``(sims (Q, k) float32, rows (Q, k) int64)`` best
first, where ``rows`` index the shard's items table; ``save(directory)`` writes its files.
Rows beyond the shard's size are padding: similarity ``-inf``, row ``-1``.

Queries must already be L2-normalised float32 (the memory layer does that once for all shards).
"""
from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np

from memory.topk import order_best_first

EMBEDDINGS_FILE = "embeddings.npy"
SCANN_DIR = "scann"
# Below this many items ScaNN's own brute force is both exact and fast (DESIGN.md, measured here).
SCANN_BRUTE_FORCE_BELOW = 20_000


def _pad(sims, rows, k):
    q, got = sims.shape
    if got >= k:
        return sims[:, :k], rows[:, :k]
    pad_s = np.full((q, k - got), -np.inf, dtype=np.float32)
    pad_r = np.full((q, k - got), -1, dtype=np.int64)
    return np.concatenate([sims, pad_s], axis=1), np.concatenate([rows, pad_r], axis=1)


class Index(Protocol):
    """The contract every backend fulfils."""

    name: str

    @classmethod
    def build(cls, embeddings: np.ndarray, docids: list[str], params: dict | None = None) -> "Index":
        """Build from L2-normalised float32 rows; ``docids`` are the item ids in row order."""

    @classmethod
    def load(cls, directory: str, params: dict) -> "Index":
        """Load from a local shard directory written by :meth:`save` and the shard writer."""

    def save(self, directory: str) -> None:
        """Write the backend's own files into a local shard directory."""

    def search(self, queries: np.ndarray, k: int, **knobs) -> tuple[np.ndarray, np.ndarray]:
        """``knobs`` are backend search settings (ScaNN: ``leaves_to_search``, ``reorder``)."""

    def __len__(self) -> int:
        """Number of items."""


class ExactIndex:
    """Brute force over every item, with exact ties: equal similarities ordered by row (= id order).

    Two kernels, chosen by storage dtype:

    - ``float32``: ScaNN's brute-force scorer without quantisation (exact float32 dot products),
      built in memory from ``embeddings.npy`` at load time. Measured here at 1M x 128 it runs at
      about 1.3x faiss ``IndexFlatIP``, ahead of the torch kernel below (about 0.8x).
    - ``float16``: half the memory; ``queries @ items.T`` in float32 over blocks with a running
      top-k (:mod:`memory.exact_kernel`, which imports torch only when used).

    Either way one extra candidate is fetched; when it ties the k-th, that query is re-scored over
    all items with one consistent kernel and cut by (similarity desc, row asc).
    """

    name = "exact"

    def __init__(self, embeddings: np.ndarray, dtype: str = "float32",
                 query_block: int = 1024, item_block: int = 8192):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"exact backend storage dtype must be float32 or float16, got {dtype!r}")
        self.dtype = dtype
        self.embeddings = np.ascontiguousarray(embeddings, dtype=dtype)
        self.query_block = int(query_block)
        self.item_block = int(item_block)
        self._torch = None  # memory.exact_kernel.BlockedKernel, made on first use (imports torch)
        self._scann = None
        if dtype == "float32" and len(self.embeddings):
            import scann

            self._scann = scann.scann_ops_pybind.builder(self.embeddings, 10, "dot_product") \
                .score_brute_force().build()

    @classmethod
    def build(cls, embeddings, docids=None, params=None):
        p = dict(params or {})
        return cls(embeddings, dtype=p.get("dtype", "float32"))

    @classmethod
    def load(cls, directory, params):
        emb = np.load(os.path.join(directory, EMBEDDINGS_FILE))
        return cls(emb, dtype=params.get("dtype", str(emb.dtype)))

    def save(self, directory):
        """Nothing of its own: ``embeddings.npy``, which the shard writer writes for every backend, is the index."""

    def __len__(self):
        return self.embeddings.shape[0]

    @property
    def kernel(self):
        if self._torch is None:
            from memory.exact_kernel import BlockedKernel

            self._torch = BlockedKernel(self.embeddings, self.query_block, self.item_block)
        return self._torch

    def search(self, queries, k, **knobs):
        # Exact search has no accuracy knobs; approximate-search settings are accepted and ignored.
        n = len(self)
        kk = min(k, n)
        keep = min(kk + 1, n)  # one extra candidate shows whether a tie straddles the k-th place
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self._scann is not None:
            rows, sims = self._scann.searcher.search_batched(q, keep, -1, -1, True, 256)
            s, r = self._exact_ties(q, np.asarray(sims, np.float32), np.asarray(rows, np.int64), kk)
            return _pad(s, r, k)
        s, r = self.kernel.topk(q, keep)
        s, r = self._exact_ties(q, s, r, kk)
        return _pad(s, r, k)

    def _exact_ties(self, q, s, r, kk):
        """Order by (similarity desc, row asc); redo queries whose k-th place is tied, exactly."""
        order = order_best_first(s, r)
        s, r = np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)
        if s.shape[1] > kk:
            tied = np.flatnonzero(s[:, kk - 1] == s[:, kk])
            if len(tied):
                # Rare (duplicate vectors at the boundary). Re-score those queries over all items
                # with one kernel, so equal vectors get bit-equal scores, and cut by (sim, row).
                full = self.kernel.all_scores(q[tied])
                for j, i in enumerate(tied):
                    cut = np.partition(full[j], -kk)[-kk]
                    cand = np.flatnonzero(full[j] >= cut)
                    o = np.lexsort((cand, -full[j, cand]))[:kk]
                    s[i, :kk], r[i, :kk] = full[j, cand[o]], cand[o]
        return s[:, :kk], r[:, :kk]


def scann_params(n: int, dim: int, overrides: dict | None = None) -> dict:
    """ScaNN parameters from a shard's size and dimension, per the ScaNN docs; any can be overridden.

    - fewer than 20k items: brute force (exact, and as fast as a tree at that size);
    - otherwise a tree with about sqrt(n) leaves, searching 5% of them (the docs' 100 of 2000; at
      least 4), asymmetric
      hashing with 2 dimensions per block and anisotropic threshold 0.2, and exact reordering of
      the best 100 candidates.
    """
    leaves = int(min(max(round(math.sqrt(n)), 2), max(n // 50, 2)))
    p = {
        "brute_force": n < SCANN_BRUTE_FORCE_BELOW,
        "num_leaves": leaves,
        "num_leaves_to_search": max(4, round(leaves / 20)),
        "training_sample_size": int(min(n, 250_000)),
        "dimensions_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "reorder": 100,
    }
    for key, value in (overrides or {}).items():
        if value is not None:
            p[key] = value
    return p


class ScannIndex:
    """A ScaNN searcher built with docids (so items can later be deleted by id), dot product."""

    name = "scann"

    def __init__(self, searcher, params, n):
        self.searcher = searcher
        self.params = params
        self.n = n
        # Search through the raw searcher and map positions to rows with an array lookup, which is
        # much faster than the wrapper's per-result docid list comprehension.
        self._pos_to_row = np.arange(n, dtype=np.int64)

    @classmethod
    def build(cls, embeddings, docids, params=None):
        import scann

        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        n, dim = emb.shape
        p = scann_params(n, dim, params)
        b = scann.scann_ops_pybind.builder(emb, 10, "dot_product")
        if p["brute_force"]:
            b = b.score_brute_force()
        else:
            b = b.tree(
                num_leaves=p["num_leaves"],
                num_leaves_to_search=p["num_leaves_to_search"],
                training_sample_size=p["training_sample_size"],
            ).score_ah(
                p["dimensions_per_block"],
                anisotropic_quantization_threshold=p["anisotropic_quantization_threshold"],
            ).reorder(p["reorder"])
        searcher = b.build(docids=[str(d) for d in docids])
        return cls(searcher, p, n)

    @classmethod
    def load(cls, directory, params):
        import scann

        searcher = scann.scann_ops_pybind.load_searcher(os.path.join(directory, SCANN_DIR))
        return cls(searcher, params, searcher.size())

    def save(self, directory):
        target = os.path.join(directory, SCANN_DIR)
        os.makedirs(target, exist_ok=True)  # ScaNN requires the directory to exist
        self.searcher.serialize(target, relative_path=True)

    def __len__(self):
        return self.n

    def search(self, queries, k, leaves_to_search=None, reorder=None):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        kk = min(k, self.n)
        pre = -1
        if not self.params.get("brute_force"):
            pre = max(int(reorder or self.params.get("reorder", 100)), kk)
        leaves = -1 if leaves_to_search is None else int(leaves_to_search)
        # The raw pybind searcher: (positions, sims), parallel over its own thread pool.
        pos, sims = self.searcher.searcher.search_batched(q, kk, pre, leaves, True, 256)
        pos = np.asarray(pos, dtype=np.int64)
        sims = np.asarray(sims, dtype=np.float32)
        valid = (pos >= 0) & np.isfinite(sims)  # ScaNN pads short results with NaN
        rows = np.where(valid, self._pos_to_row[np.where(valid, pos, 0)], -1)
        sims = np.where(valid, sims, -np.inf).astype(np.float32)
        return _pad(sims, rows, k)


BACKENDS: dict[str, type[Index]] = {"exact": ExactIndex, "scann": ScannIndex}


def backend(name: str) -> type[Index]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
