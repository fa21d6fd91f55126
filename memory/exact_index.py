"""The exact backend: brute force over a shard's stored copy, in its storage mode, with exact ties."""
from __future__ import annotations

import numpy as np

from memory import quantize
from memory.stored_vectors import load_vectors, storage_mode
from memory.topk import order_best_first, pad_results

EXACT_MODES = ("float32", "float16", "int8", "pca")


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
            return pad_results(s, r, k)
        s, r = self.kernel.topk(q, keep)
        s, r = self._exact_ties(q, s, r, kk)
        return pad_results(s, r, k)

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
