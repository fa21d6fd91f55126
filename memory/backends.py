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

import numpy as np
import torch

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


class Index:
    """The contract every backend fulfils."""

    name: str

    @classmethod
    def build(cls, embeddings: np.ndarray, docids: list[str], params: dict | None = None) -> "Index":
        raise NotImplementedError

    @classmethod
    def load(cls, directory: str, params: dict) -> "Index":
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class ExactIndex(Index):
    """Brute force: ``queries @ items.T`` in blocks, a top-k per block, exact ties by row.

    Items are kept as float32 or float16 (half the memory; scores are computed in float32).
    Blocks keep the score matrix in cache-sized pieces so the top-k selection, which dominates
    brute-force search on a CPU, reads hot memory.
    """

    name = "exact"

    def __init__(self, embeddings: np.ndarray, dtype: str = "float32",
                 query_block: int = 1024, item_block: int = 65536):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"exact backend storage dtype must be float32 or float16, got {dtype!r}")
        self.dtype = dtype
        self.embeddings = np.ascontiguousarray(embeddings, dtype=dtype)
        self._items = torch.from_numpy(self.embeddings)
        self.query_block = int(query_block)
        self.item_block = int(item_block)

    @classmethod
    def build(cls, embeddings, docids=None, params=None):
        p = dict(params or {})
        return cls(embeddings, dtype=p.get("dtype", "float32"))

    @classmethod
    def load(cls, directory, params):
        emb = np.load(os.path.join(directory, EMBEDDINGS_FILE))
        return cls(emb, dtype=params.get("dtype", str(emb.dtype)))

    def save(self, directory):
        # The embeddings file is written by the shard writer for every backend; nothing else here.
        pass

    def __len__(self):
        return self.embeddings.shape[0]

    def _block_scores(self, qb, i0):
        items = self._items[i0:i0 + self.item_block]
        return qb @ (items if items.dtype == torch.float32 else items.float()).T

    def search(self, queries, k):
        n = len(self)
        kk = min(k, n)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        out_s = np.empty((q.shape[0], kk), dtype=np.float32)
        out_r = np.empty((q.shape[0], kk), dtype=np.int64)
        for q0 in range(0, q.shape[0], self.query_block):
            qb = q[q0:q0 + self.query_block]
            best_s, best_r = None, None
            for i0 in range(0, n, self.item_block):
                scores = self._block_scores(qb, i0)
                # One extra candidate shows whether a tie straddles the k-th place.
                s, r = torch.topk(scores, min(kk + 1, scores.shape[1]), dim=1, sorted=True)
                r = r + i0
                if best_s is not None:
                    s, r = torch.cat([best_s, s], 1), torch.cat([best_r, r], 1)
                    s, pos = torch.topk(s, min(kk + 1, s.shape[1]), dim=1, sorted=True)
                    r = torch.gather(r, 1, pos)
                best_s, best_r = s, r
            s, r = self._exact_ties(qb, best_s.numpy(), best_r.numpy(), kk)
            out_s[q0:q0 + len(qb)], out_r[q0:q0 + len(qb)] = s, r
        return _pad(out_s, out_r, k)

    def _exact_ties(self, qb, s, r, kk):
        """Order by (similarity desc, row asc); redo rows whose k-th place is tied, exactly."""
        order = order_best_first(s, r)
        s, r = np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)
        if s.shape[1] > kk:
            tied = np.flatnonzero(s[:, kk - 1] == s[:, kk])
            if len(tied):
                # Recompute with the very same block shapes, so tied scores compare equal bit for bit
                # (a one-row product may round differently), and keep every item at the boundary.
                cand_s, cand_r = [[] for _ in tied], [[] for _ in tied]
                for i0 in range(0, len(self), self.item_block):
                    block = self._block_scores(qb, i0).numpy()
                    for j, i in enumerate(tied):
                        hit = np.flatnonzero(block[i] >= s[i, kk - 1])
                        cand_s[j].append(block[i, hit])
                        cand_r[j].append(hit + i0)
                for j, i in enumerate(tied):
                    cs, cr = np.concatenate(cand_s[j]), np.concatenate(cand_r[j])
                    o = np.lexsort((cr, -cs))[:kk]
                    s[i, :kk], r[i, :kk] = cs[o], cr[o]
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


class ScannIndex(Index):
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


BACKENDS = {"exact": ExactIndex, "scann": ScannIndex}


def backend(name: str) -> type[Index]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
