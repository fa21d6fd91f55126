"""Index backends behind one small interface: exact (:mod:`memory.exact_index`) and ScaNN
(:mod:`memory.scann_index`); a shard's stored copy of its vectors is :mod:`memory.stored_vectors`.

Interface (see :class:`Index`): ``build(embeddings, docids, params)`` and ``load(directory)``
construct one; ``search(queries, k)`` returns ``(sims (Q, k) float32, rows (Q, k) int64)`` best
first, where ``rows`` index the shard's items table; ``save(directory)`` writes its files.
Rows beyond the shard's size are padding: similarity ``-inf``, row ``-1``.

Queries must already be L2-normalised float32 (the memory layer does that once for all shards).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from memory.exact_index import ExactIndex
from memory.scann_index import ScannIndex


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


BACKENDS: dict[str, type[Index]] = {"exact": ExactIndex, "scann": ScannIndex}


def backend(name: str) -> type[Index]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown index backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
