"""A memory's item columns (id, label, weight) over all its shards, under one integer key per item.

Shard searches return similarities and rows; the memory turns rows into keys (``offset of the
shard + row``), merges on numbers (:func:`memory.topk.merge_keys`) and gathers the columns once, for
the k neighbours it keeps. Local shards' columns are concatenated once at open (each shard then
holds views of them, so nothing is stored twice); Ray-hosted shards keep theirs and are asked for
the rows they own.
"""
from __future__ import annotations

import numpy as np


class ItemColumns:
    """Every item of an opened memory: ``take(keys)`` gives ids, labels and weights by key."""

    def __init__(self, shards):
        self.shards = shards
        counts = [s.entry.count for s in shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.ids = self.labels = self.weights = None
        if shards and all(hasattr(s, "use_columns") for s in shards):
            self.ids = np.concatenate([s.ids for s in shards])
            self.labels = np.concatenate([s.labels for s in shards])
            self.weights = np.concatenate([s.weights for s in shards])
            for s, a, b in zip(shards, self.offsets[:-1], self.offsets[1:]):
                s.use_columns(self.ids[a:b], self.labels[a:b], self.weights[a:b])

    def keys(self, index: int, rows: np.ndarray) -> np.ndarray:
        """Keys of shard ``index``'s ``rows`` (padding -1 stays -1)."""
        offset = self.offsets[index]
        if offset == 0:
            return rows
        keys = rows + offset
        keys[rows < 0] = -1
        return keys

    def take(self, keys: np.ndarray):
        """``(ids, labels, weights)`` of ``keys``, any shape; -1 is padding (id '', label -1, weight 0)."""
        valid = keys >= 0
        if self.ids is not None:
            if valid.all():  # the common case: plain gathers, no masking passes
                return self.ids[keys], self.labels[keys], self.weights[keys]
            safe = np.where(valid, keys, 0)
            return (np.where(valid, self.ids[safe], ""), np.where(valid, self.labels[safe], -1),
                    np.where(valid, self.weights[safe], 0.0).astype(np.float32))
        ids = np.full(keys.shape, "", dtype=object)
        labels = np.full(keys.shape, -1, np.int64)
        weights = np.zeros(keys.shape, np.float32)
        owner = np.searchsorted(self.offsets, keys, side="right") - 1
        for i in np.unique(owner[valid]):
            sel = valid & (owner == i)
            ids[sel], labels[sel], weights[sel] = self.shards[i].take(keys[sel] - self.offsets[i])
        return ids, labels, weights

    def ids_of(self, keys: np.ndarray) -> np.ndarray:
        return self.take(keys)[0]
