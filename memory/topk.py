"""Pure top-k helpers: order candidates best first with a deterministic tie rule, merge shard lists.

The order everywhere is: higher similarity first, and among equal similarities the smaller item id
first. Padding (a shard with fewer than k items) has similarity ``-inf`` and sorts last.
"""
from __future__ import annotations

import numpy as np


def order_best_first(sims: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Column order ``(Q, M)`` sorting each row by similarity descending, then by ``keys`` ascending.

    ``keys`` are the tie-breakers (item ids, or row numbers within one shard). The string sort only
    runs on the rows that actually contain equal similarities, which are rare in real data.
    """
    order = np.argsort(-sims, axis=1, kind="stable")
    if sims.shape[1] < 2:
        return order
    s = np.take_along_axis(sims, order, axis=1)
    tied_rows = np.flatnonzero(((s[:, 1:] == s[:, :-1]) & np.isfinite(s[:, 1:])).any(axis=1))
    for r in tied_rows:  # rare: exact duplicates or identical vectors
        order[r] = np.lexsort((keys[r], -sims[r]))
    return order


def merge_topk(results, k: int):
    """Merge per-shard top-k lists into the global top-k.

    Args:
        results: a sequence of ``(sims (Q, k_i), ids (Q, k_i), *payload)`` tuples, one per shard,
            each best first; ``payload`` arrays (labels, weights, ...) travel with their columns.
        k: how many to keep.

    Returns:
        ``(sims, ids, *payload)``, each ``(Q, min(k, sum k_i))``, best first, equal similarities
        ordered by id.
    """
    if not results:
        raise ValueError("merge_topk needs at least one shard result")
    width = len(results[0])
    cols = [np.concatenate([r[i] for r in results], axis=1) for i in range(width)]
    sims, ids = cols[0], cols[1]
    order = order_best_first(sims, ids)[:, :k]
    return tuple(np.take_along_axis(c, order, axis=1) for c in cols)
