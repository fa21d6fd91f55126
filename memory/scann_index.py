"""The ScaNN backend: a shard's tree (or brute force) searcher, its parameters, deletion by position."""
from __future__ import annotations

import math
import os

import numpy as np

from memory import quantize
from memory.leaf_budget import LeafBudget
from memory.topk import pad_results

SCANN_DIR = "scann"
# Below this many items ScaNN's own brute force is exact and as fast as a tree. From 5,000 items a
# tuned tree is 2-5x faster per call (128-d, 16 or 256 queries a call: 0.13 vs 0.43 ms at 5k items,
# 0.17 vs 0.89 ms at 10k), which is what a routed search over many small shards pays per shard;
# the ScaNN docs' 20k rule of thumb left 128 routed shards of 7,800 items at 0.37x one tree.
SCANN_BRUTE_FORCE_BELOW = 5_000

# Asymmetric-hashing blocks by storage mode: dimensions per block and ScaNN's hash type (lut16: 16
# centres, 4 bits a block; lut256: 256 centres, 8 bits; ``hash_type`` can be overridden). The
# reordering modes score candidates on 2 bits a dimension and reorder them; ``codes`` searches on its
# codes alone, so it spends 4 bits on every dimension. 256 centres per 2-dimension block (the same
# bytes) was measured too, on 68,000 Fashion-MNIST embeddings (1,280-d): 406 s to build against
# 71 s for int8, 387 queries/s, 1,610 bytes per item in RAM once loaded, and its votes agreed with
# exact search on 98.95% of queries, no more than ScaNN float32 at the same tuned recall: lut16 stays.
DIMS_PER_BLOCK = {"float32": 2, "float16": 2, "int8": 2, "codes": 1}
HASH_TYPE = {"float32": "lut16", "float16": "lut16", "int8": "lut16", "codes": "lut16"}


def scann_params(n: int, dim: int, overrides: dict | None = None) -> dict:
    """ScaNN parameters from a shard's size, dimension and storage mode, per the ScaNN docs; any can be overridden.

    - fewer than 5,000 items: brute force (exact, and as fast as a tree at that size), on the mode's
      reorder data (``codes``: on its hashing codes);
    - otherwise a tree with about sqrt(n) leaves, searching 5% of them (the docs' 100 of 2000; at
      least 4), asymmetric hashing (``DIMS_PER_BLOCK``) with anisotropic threshold 0.2, and
      reordering of the best 100 candidates on the mode's reorder data: float32, bfloat16 for
      ``float16`` (ScaNN's half type), ScaNN's int8 for ``int8``; none for ``codes``.
    """
    mode = quantize.check_mode((overrides or {}).get("storage") or "float32", "scann")
    leaves = int(min(max(round(math.sqrt(n)), 2), max(n // 50, 2)))
    p = {
        "storage": mode,
        "brute_force": n < SCANN_BRUTE_FORCE_BELOW,
        "num_leaves": leaves,
        "num_leaves_to_search": max(4, round(leaves / 20)),
        "training_sample_size": int(min(n, 250_000)),
        "dimensions_per_block": DIMS_PER_BLOCK[mode],
        "hash_type": HASH_TYPE[mode],
        "anisotropic_quantization_threshold": 0.2,
        "reorder": 0 if mode == "codes" else 100,
    }
    for key, value in (overrides or {}).items():
        if value is not None:
            p[key] = value
    if mode == "codes":
        p["reorder"] = 0  # nothing to reorder on: the codes are the only copy ScaNN holds
    return p


class ScannIndex:
    """A ScaNN searcher, dot product; items are deleted by position (``delete_rows``)."""

    name = "scann"

    def __init__(self, searcher, params, n, leaves=None):
        self.searcher = searcher
        self.params = params
        self.n = n  # rows of the shard's items table; deletions do not change it
        # Search through the raw searcher and map positions to rows with an array lookup, which is
        # much faster than the wrapper's per-result docid list comprehension.
        self._pos_to_row = np.arange(n, dtype=np.int64)
        self.leaves = leaves  # memory.leaf_budget.LeafBudget of a loaded tree, else None

    @classmethod
    def build(cls, embeddings, docids, params=None):
        """A searcher over float32 rows in ``params["storage"]``'s form (``scann_params``).

        Built without ScaNN's docids: its C++ searcher deletes by position either way, and the
        wrapper's docid list and dict cost about 170 bytes per item in RAM (measured); the items
        table holds the ids.
        """
        import scann

        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        n, dim = emb.shape
        p = scann_params(n, dim, params)
        searcher = cls._builder(scann.scann_ops_pybind.builder(emb, 10, "dot_product"), p).build()
        return cls(searcher, p, n)

    @staticmethod
    def _builder(b, p):
        """The ScaNN builder for parameters ``p``: scoring and reorder data in the storage mode's form."""
        from scann.scann_ops.py.scann_builder import ReorderType

        mode = p["storage"]
        kind = {"float32": ReorderType.FLOAT32, "float16": ReorderType.BFLOAT16, "int8": ReorderType.INT8}.get(mode)
        ah = {"anisotropic_quantization_threshold": p["anisotropic_quantization_threshold"],
              "hash_type": p.get("hash_type", "lut16")}  # shards built before hash_type was recorded: lut16
        if p["brute_force"]:
            return b.score_ah(p["dimensions_per_block"], **ah) if mode == "codes" else b.score_brute_force(kind)
        b = b.tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["num_leaves_to_search"],
                   training_sample_size=p["training_sample_size"]).score_ah(p["dimensions_per_block"], **ah)
        return b if mode == "codes" else b.reorder(p["reorder"], quantize=kind)

    @classmethod
    def load(cls, directory, params):
        import scann

        searcher = scann.scann_ops_pybind.load_searcher(os.path.join(directory, SCANN_DIR))
        # Read now: a downloaded shard folder is deleted once the shard is open.
        leaves = None if params.get("brute_force") else LeafBudget.read(os.path.join(directory, SCANN_DIR))
        return cls(searcher, params, searcher.size(), leaves)

    def save(self, directory):
        target = os.path.join(directory, SCANN_DIR)
        os.makedirs(target, exist_ok=True)  # ScaNN requires the directory to exist
        self.searcher.serialize(target, relative_path=True)

    def __len__(self):
        return self.n

    @property
    def live(self) -> int:
        """Items still in the searcher (rows minus deleted ones)."""
        return self.searcher.size()

    def delete_rows(self, rows) -> None:
        """Delete items-table ``rows`` (each at most once) from this loaded searcher, in memory only.

        Why delete rather than skip: over-fetching past removed items re-reads the leaves already
        searched (a removed class left queries next to it padded, or at recall@50 0.17-0.38), and
        its candidate arrays grow with queries x removed items. Deleted items cost nothing at
        search time; :mod:`memory.leaf_budget` then widens the search where leaves thinned out.

        ScaNN removes a datapoint by moving the last position into its place (``RemoveDatapoint``
        and ``OnDatapointIndexRename`` in ScaNN's tree-X mutator); deleting in descending position
        order means only live items ever move, and the same moves are replayed on the position-to-row
        map. Files on disk are untouched: another open of the same shard still holds every item.
        Not safe while another thread searches this index (``Memory.open`` deletes before serving).
        """
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if not len(rows):
            return
        row_to_pos = np.full(self.n, -1, np.int64)
        row_to_pos[self._pos_to_row] = np.arange(len(self._pos_to_row))
        if (rows < 0).any() or (rows >= self.n).any() or (row_to_pos[rows] < 0).any():
            raise ValueError(f"cannot delete rows {rows.tolist()[:5]}...: not live rows of this {self.n}-row index")
        positions = np.sort(row_to_pos[rows])[::-1].tolist()
        pos_to_row = self._pos_to_row.tolist()
        for p in positions:
            pos_to_row[p] = pos_to_row[-1]
            pos_to_row.pop()
        if self.searcher.docids is not None:  # keep the wrapper's docid list in step, through its own API
            self.searcher.delete([self.searcher.docids[p] for p in positions])
        else:
            self.searcher.searcher.delete(positions)
        self._pos_to_row = np.asarray(pos_to_row, dtype=np.int64)
        if self.leaves is not None:
            self.leaves.remove(rows)

    def search(self, queries, k, leaves_to_search=None, reorder=None):
        """Top-k live items. After deletions a tree searches more leaves where they thinned out
        (:mod:`memory.leaf_budget`), and any query still short of ``min(k, live)`` results is
        searched again with twice the leaves, up to all of them, so every query gets them.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        kk = min(k, self.live)
        if kk == 0 or len(q) == 0:
            return pad_results(np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64), k)
        pre = -1
        if not self.params.get("brute_force"):
            pre = max(int(reorder or self.params.get("reorder", 100)), kk)
        if self.leaves is None or not self.leaves.depleted:
            # A tree's tuned leaf count (memory.tuning) is in its params, not in ScaNN's own config.
            default = -1 if self.params.get("brute_force") else int(self.params.get("num_leaves_to_search", -1))
            sims, rows = self._search(q, kk, pre, default if leaves_to_search is None else int(leaves_to_search))
        else:
            base = int(leaves_to_search or self.params["num_leaves_to_search"])
            per_query = self.leaves.leaves(q, base)
            counts, sizes = np.unique(per_query, return_counts=True)
            for i in range(len(counts) - 1):  # a group under one ScaNN batch joins the next: fewer calls
                if sizes[i] < 256:
                    per_query[per_query == counts[i]] = counts[i + 1]
                    sizes[i + 1] += sizes[i]
            sims, rows = np.empty((len(q), kk), np.float32), np.empty((len(q), kk), np.int64)
            for count in np.unique(per_query):
                sel = np.flatnonzero(per_query == count)
                sims[sel], rows[sel] = self._search(q[sel], kk, pre, int(count))
        if not self.params.get("brute_force"):
            self._fill_short(q, kk, pre, sims, rows, leaves_to_search)
        return pad_results(sims, rows, k)

    def _search(self, q, kk, pre, leaves):
        """One raw ScaNN call: ``(sims, rows)`` ``(Q, kk)``, short results padded (-inf, -1)."""
        # The raw pybind searcher: (positions, sims), parallel over its own thread pool.
        pos, sims = self.searcher.searcher.search_batched(q, kk, pre, leaves, True, 256)
        pos = np.asarray(pos, dtype=np.int64)
        sims = np.asarray(sims, dtype=np.float32)
        if len(self._pos_to_row) == self.n and np.isfinite(sims).all():  # nothing deleted, no padding
            return pad_results(sims, pos, kk)  # positions are rows
        valid = (pos >= 0) & np.isfinite(sims)  # ScaNN pads short results with NaN
        rows = np.where(valid, self._pos_to_row[np.where(valid, pos, 0)], -1)
        sims = np.where(valid, sims, -np.inf).astype(np.float32)
        return pad_results(sims, rows, kk)

    def _fill_short(self, q, kk, pre, sims, rows, leaves_to_search):
        """Search queries with fewer than ``kk`` results again with twice the leaves, in place."""
        total = self.leaves.num_leaves if self.leaves is not None else int(self.params["num_leaves"])
        count = int(leaves_to_search or self.params["num_leaves_to_search"])
        short = np.flatnonzero(rows[:, kk - 1] < 0)
        while len(short) and count < total:
            count = min(total, 2 * count)
            sims[short], rows[short] = self._search(q[short], kk, pre, count)
            short = short[rows[short, kk - 1] < 0]
