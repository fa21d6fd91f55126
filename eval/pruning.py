"""Memory pruning (section 3.5, Appendix G), in process: each item's wrong contributions from one search of all.

Query the memory with its own items, leave each item's self-match out, take the top-K neighbours and
count, per memory item, how often it was a neighbour whose label differed from the query's: ``v``.

- hard pruning drops items with ``v >= threshold`` (paper: 128 at K = 100);
- soft pruning multiplies an item's vote by ``gamma = dd / (c + v)`` for ``v > 0`` (1 for v = 0),
  ``c = 1``, ``dd = 1.75``: 0.875, 0.159, 0.017 for v = 1, 10, 100.

:func:`wrong_contributions` is the reference count over one neighbour list per item; ``vismem prune``
(``memory.pruning``, ``pipelines.prune``) counts shard by shard and must equal it.
"""
from __future__ import annotations

import numpy as np

# The count and the formulas live with the memory operation (vismem prune); this lays them out per item.
from memory.pruning import block_counts, hard_keep, soft_weights

__all__ = ["hard_keep", "soft_weights", "wrong_contributions"]


def wrong_contributions(query_ids, query_labels, neighbour_ids, neighbour_labels, item_ids, *, k: int) -> np.ndarray:
    """``v`` per memory item (in ``item_ids`` order) from a self-query of the memory.

    Args:
        query_ids, query_labels: ``(Q,)`` the memory items used as queries.
        neighbour_ids, neighbour_labels: ``(Q, K')`` their neighbours, best first, from a search at
            ``K' >= k + 1`` (the self-match is removed here, then the first ``k`` others are kept).
        item_ids: ``(N,)`` every memory item, the order of the returned counts.
        k: neighbours per query that count.
    """
    hit_ids, hits = block_counts(query_ids, query_labels, neighbour_ids, neighbour_labels, k)
    items = np.asarray(item_ids).astype(str)
    position = {item: i for i, item in enumerate(items)}
    idx = np.fromiter((position.get(i, -1) for i in hit_ids), dtype=np.int64, count=len(hit_ids))
    if (idx < 0).any():
        raise ValueError(f"neighbour id {hit_ids[idx < 0][0]!r} is not among the memory's items")
    counts = np.zeros(len(items), dtype=np.int64)
    counts[idx] = hits  # block_counts gives each id once
    return counts
