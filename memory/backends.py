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

from memory import quantize
from memory.leaf_budget import LeafBudget
from memory.topk import order_best_first

EMBEDDINGS_FILE = "embeddings.npy"
SCALES_FILE = "embedding_scales.npy"  # per-vector scales of the int8 and codes modes' stored copy
CODEBOOK_FILE = "embedding_codebook.npz"  # the pca mode's per-shard codebook (memory.transform_codes)
SCANN_DIR = "scann"
EXACT_MODES = ("float32", "float16", "int8", "pca")
# Below this many items ScaNN's own brute force is exact and as fast as a tree. From 5,000 items a
# tuned tree is 2-5x faster per call (128-d, 16 or 256 queries a call: 0.13 vs 0.43 ms at 5k items,
# 0.17 vs 0.89 ms at 10k), which is what a routed search over many small shards pays per shard;
# the ScaNN docs' 20k rule of thumb left 128 routed shards of 7,800 items at 0.37x one tree.
SCANN_BRUTE_FORCE_BELOW = 5_000


def storage_mode(params: dict | None, vectors: np.ndarray | None = None) -> str:
    """A shard's storage mode: ``params["storage"]``; older shards recorded ``dtype`` or only the file's dtype."""
    p = params or {}
    mode = p.get("storage") or p.get("dtype") or (str(vectors.dtype) if vectors is not None else "float32")
    return quantize.check_mode(mode)


def vector_files(mode: str) -> list[str]:
    """The files of a shard's stored copy in ``mode`` (relative to the shard folder)."""
    return [EMBEDDINGS_FILE] + {"int8": [SCALES_FILE], "codes": [SCALES_FILE], "pca": [CODEBOOK_FILE]}.get(mode, [])


def save_vectors(directory: str, arrays: dict) -> None:
    """Write :func:`memory.quantize.encode`'s arrays into a local shard folder."""
    np.save(os.path.join(directory, EMBEDDINGS_FILE), arrays["vectors"])
    if "scales" in arrays:
        np.save(os.path.join(directory, SCALES_FILE), arrays["scales"])
    if "codebook" in arrays:
        np.savez(os.path.join(directory, CODEBOOK_FILE), **arrays["codebook"])


def load_vectors(directory: str, mmap: bool = False) -> dict:
    """The stored copy's arrays (``vectors``, and ``scales`` where the mode has them) from a local folder."""
    mode = "r" if mmap else None
    out = {"vectors": np.load(os.path.join(directory, EMBEDDINGS_FILE), mmap_mode=mode)}
    scales = os.path.join(directory, SCALES_FILE)
    if os.path.exists(scales):
        out["scales"] = np.load(scales, mmap_mode=mode)
    codebook = os.path.join(directory, CODEBOOK_FILE)
    if os.path.exists(codebook):
        out["codebook"] = read_codebook(codebook)
    return out


def read_codebook(path_or_file) -> dict:
    """The pca mode's codebook arrays from its ``.npz`` (a path or an open binary file)."""
    with np.load(path_or_file, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


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

    The index is the shard's stored copy (:mod:`memory.quantize`), its kernel chosen by storage mode:

    - ``float32``: ScaNN's brute-force scorer without quantisation (exact float32 dot products),
      built in memory from ``embeddings.npy`` at load time. Measured here at 1M x 128 it runs at
      about 1.3x faiss ``IndexFlatIP``, ahead of the torch kernel below (about 0.8x).
    - ``float16`` (half the memory) and ``int8`` (a quarter, per-vector scaled):
      ``queries @ items.T`` in float32 over blocks with a running top-k (:mod:`memory.exact_kernel`,
      which imports torch only when used). Scores are exact for the stored (rounded) vectors.
    - ``pca`` (an eighth): the same blocks over PCA transform codes, each block's levels read from
      the bitstreams and scored on the kept axes (``<R^T q, y^> + <q, mean>``), never at full dimension.

    Either way one extra candidate is fetched; when it ties the k-th, that query is re-scored over
    all items with one consistent kernel and cut by (similarity desc, row asc).
    """

    name = "exact"

    def __init__(self, embeddings: np.ndarray, dtype: str = "float32", scales: np.ndarray | None = None,
                 query_block: int = 1024, item_block: int = 8192, codebook: dict | None = None):
        if dtype not in EXACT_MODES:
            raise ValueError(f"exact backend storage must be one of {', '.join(EXACT_MODES)}, got {dtype!r}")
        if dtype == "int8" and scales is None:
            raise ValueError("int8 storage needs the per-vector scales")
        if dtype == "pca" and codebook is None:
            raise ValueError("pca storage needs the shard's codebook")
        self.dtype = dtype
        self.codebook = codebook
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.uint8 if dtype == "pca" else dtype)
        self.scales = None if scales is None else np.ascontiguousarray(scales, dtype=np.float32)
        self.query_block = int(query_block)
        self.item_block = int(item_block)
        self._torch = None  # memory.exact_kernel.BlockedKernel, made on first use (imports torch)
        self._scann = None
        self._n = len(self.embeddings)
        if dtype == "float32" and self._n:
            import scann

            self._scann = scann.scann_ops_pybind.builder(self.embeddings, 10, "dot_product") \
                .score_brute_force().build()
            # ScaNN keeps its own copy: keeping ours as well doubled the shard's RAM (10,367 bytes per
            # 1,280-d item against 5,120). Ties are re-scored by ScaNN too (_all_scores).
            self.embeddings = None

    @classmethod
    def build(cls, embeddings, docids=None, params=None):
        """From float32 rows, stored as ``params["storage"]`` (default float32) would store them."""
        return cls.from_stored(quantize.encode(embeddings, storage_mode(params)), params)

    @classmethod
    def load(cls, directory, params):
        return cls.from_stored(load_vectors(directory), params)

    @classmethod
    def from_stored(cls, arrays, params):
        """From the stored copy's arrays (:func:`memory.quantize.encode`'s, or :func:`load_vectors`'s)."""
        return cls(arrays["vectors"], dtype=storage_mode(params, arrays["vectors"]), scales=arrays.get("scales"),
                   codebook=arrays.get("codebook"))

    def save(self, directory):
        """Nothing of its own: the stored copy, which the shard writer writes for every backend, is the index."""

    def __len__(self):
        return self._n

    @property
    def kernel(self):
        if self._torch is None:
            from memory.exact_kernel import BlockedKernel

            if self.dtype == "pca":
                from memory.exact_kernel import TransformCodes

                # Every query in one pass over the items: a block's levels are read once, not per query block.
                self._torch = BlockedKernel(self.embeddings, max(self.query_block, 8192), self.item_block,
                                            codes=TransformCodes(self.codebook))
            else:
                self._torch = BlockedKernel(self.embeddings, self.query_block, self.item_block, self.scales)
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
                full = self._all_scores(q[tied])
                for j, i in enumerate(tied):
                    cut = np.partition(full[j], -kk)[-kk]
                    cand = np.flatnonzero(full[j] >= cut)
                    o = np.lexsort((cand, -full[j, cand]))[:kk]
                    s[i, :kk], r[i, :kk] = full[j, cand[o]], cand[o]
        return s[:, :kk], r[:, :kk]

    def _all_scores(self, q):
        """Scores of ``q`` against every item ``(Q, N)``, all from one kernel (ScaNN's for float32)."""
        if self._scann is None:
            return self.kernel.all_scores(q)
        rows, sims = self._scann.searcher.search_batched(q, self._n, -1, -1, True, 256)
        full = np.empty((len(q), self._n), np.float32)
        np.put_along_axis(full, np.asarray(rows, np.int64), np.asarray(sims, np.float32), 1)
        return full


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
            return _pad(np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64), k)
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
        return _pad(sims, rows, k)

    def _search(self, q, kk, pre, leaves):
        """One raw ScaNN call: ``(sims, rows)`` ``(Q, kk)``, short results padded (-inf, -1)."""
        # The raw pybind searcher: (positions, sims), parallel over its own thread pool.
        pos, sims = self.searcher.searcher.search_batched(q, kk, pre, leaves, True, 256)
        pos = np.asarray(pos, dtype=np.int64)
        sims = np.asarray(sims, dtype=np.float32)
        if len(self._pos_to_row) == self.n and np.isfinite(sims).all():  # nothing deleted, no padding
            return _pad(sims, pos, kk)  # positions are rows
        valid = (pos >= 0) & np.isfinite(sims)  # ScaNN pads short results with NaN
        rows = np.where(valid, self._pos_to_row[np.where(valid, pos, 0)], -1)
        sims = np.where(valid, sims, -np.inf).astype(np.float32)
        return _pad(sims, rows, kk)

    def _fill_short(self, q, kk, pre, sims, rows, leaves_to_search):
        """Search queries with fewer than ``kk`` results again with twice the leaves, in place."""
        total = self.leaves.num_leaves if self.leaves is not None else int(self.params["num_leaves"])
        count = int(leaves_to_search or self.params["num_leaves_to_search"])
        short = np.flatnonzero(rows[:, kk - 1] < 0)
        while len(short) and count < total:
            count = min(total, 2 * count)
            sims[short], rows[short] = self._search(q[short], kk, pre, count)
            short = short[rows[short, kk - 1] < 0]


BACKENDS: dict[str, type[Index]] = {"exact": ExactIndex, "scann": ScannIndex}


def backend(name: str) -> type[Index]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
