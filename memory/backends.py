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

    def search(self, queries: np.ndarray, k: int, **knobs) -> tuple[np.ndarray, np.ndarray]:
        """``knobs`` are backend search settings (ScaNN: ``leaves_to_search``, ``reorder``)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class ExactIndex(Index):
    """Brute force over every item, with exact ties: equal similarities ordered by row (= id order).

    Two kernels, chosen by storage dtype:

    - ``float32``: ScaNN's brute-force scorer without quantisation (exact float32 dot products),
      built in memory from ``embeddings.npy`` at load time. Measured here at 1M x 128 it runs at
      about 1.3x faiss ``IndexFlatIP``, ahead of the torch kernel below (about 0.8x).
    - ``float16``: half the memory; ``queries @ items.T`` in float32 over blocks with a running
      top-k (:func:`_select`).

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
        self._items = torch.from_numpy(self.embeddings)
        self.query_block = int(query_block)
        self.item_block = int(item_block)
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
        # The embeddings file is written by the shard writer for every backend; nothing else here.
        pass

    def __len__(self):
        return self.embeddings.shape[0]

    def _block_scores(self, qb, i0, buf=None):
        items = self._items[i0:i0 + self.item_block]
        if items.dtype != torch.float32:
            items = items.float()
        if buf is None:
            return qb @ items.T
        # Writing into one preallocated buffer avoids a fresh multi-MB allocation (and its page
        # faults) per block, which otherwise costs a third of the matrix product's time.
        out = buf[: qb.shape[0] * items.shape[0]].view(qb.shape[0], items.shape[0])
        return torch.mm(qb, items.T, out=out)

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
        out_s = np.empty((len(q), kk), dtype=np.float32)
        out_r = np.empty((len(q), kk), dtype=np.int64)
        qt = torch.from_numpy(q)
        buf = torch.empty(min(self.query_block, len(q)) * min(self.item_block, n))
        for q0 in range(0, len(q), self.query_block):
            qb = qt[q0:q0 + self.query_block]
            best_s = torch.full((len(qb), keep), -math.inf)
            best_r = torch.full((len(qb), keep), -1, dtype=torch.int64)
            for i0 in range(0, n, self.item_block):
                best_s, best_r = _select(self._block_scores(qb, i0, buf), i0, best_s, best_r)
            s, r = self._exact_ties(qb.numpy(), best_s.numpy(), best_r.numpy(), kk)
            out_s[q0:q0 + len(qb)], out_r[q0:q0 + len(qb)] = s, r
        return _pad(out_s, out_r, k)

    def _exact_ties(self, q, s, r, kk):
        """Order by (similarity desc, row asc); redo queries whose k-th place is tied, exactly."""
        order = order_best_first(s, r)
        s, r = np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)
        if s.shape[1] > kk:
            tied = np.flatnonzero(s[:, kk - 1] == s[:, kk])
            if len(tied):
                # Rare (duplicate vectors at the boundary). Re-score those queries over all items
                # with one kernel, so equal vectors get bit-equal scores, and cut by (sim, row).
                qt = torch.from_numpy(np.ascontiguousarray(q[tied], dtype=np.float32))
                full = np.concatenate(
                    [self._block_scores(qt, i0).numpy() for i0 in range(0, len(self), self.item_block)], axis=1)
                for j, i in enumerate(tied):
                    cut = np.partition(full[j], -kk)[-kk]
                    cand = np.flatnonzero(full[j] >= cut)
                    o = np.lexsort((cand, -full[j, cand]))[:kk]
                    s[i, :kk], r[i, :kk] = full[j, cand[o]], cand[o]
        return s[:, :kk], r[:, :kk]


_GROUP = 64  # items per group in the threshold pre-filter of _select


def _merge(best_s, best_r, s, r):
    s, pos = torch.topk(torch.cat([best_s, s], 1), best_s.shape[1], dim=1)
    return s, torch.gather(torch.cat([best_r, r], 1), 1, pos)


def _select(scores, i0, best_s, best_r):
    """Fold one block of scores ``(m, w)`` (item rows from ``i0``) into the running top-``K``.

    A full top-k over every block costs nearly as much as the matrix product. Once the running
    K-th best is known, few groups of items can beat it: a cheap max per group of 64 finds them,
    and only those groups are selected from. Early blocks (nothing known yet) take the full path.
    """
    m, w = scores.shape
    keep = best_s.shape[1]
    groups = w // _GROUP
    if groups >= 2 and w % _GROUP == 0:
        view = scores.view(m, groups, _GROUP)
        hit = view.amax(2) > best_s[:, -1:]
        rows, grp = hit.nonzero(as_tuple=True)
        if len(rows) == 0:
            return best_s, best_r
        if len(rows) <= m * groups // 8:
            v = view[rows, grp]  # (hits, group): every item of each hit group is a candidate
            idx = grp[:, None] * _GROUP + torch.arange(_GROUP) + i0
            # Lay each row's hits side by side: hit h of row r goes to columns [h*G, (h+1)*G).
            counts = torch.bincount(rows, minlength=m)
            first = torch.cumsum(counts, 0) - counts
            slot = torch.arange(len(rows)) - first[rows]
            width = int(counts.max()) * _GROUP
            pad_s = torch.full((m, width), -math.inf)
            pad_r = torch.full((m, width), -1, dtype=torch.int64)
            cols = slot[:, None] * _GROUP + torch.arange(_GROUP)
            pad_s[rows[:, None], cols] = v
            pad_r[rows[:, None], cols] = idx
            return _merge(best_s, best_r, pad_s, pad_r)
    s, r = torch.topk(scores, min(keep, w), dim=1, sorted=False)
    return _merge(best_s, best_r, s, r + i0)


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
