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

from memory.pruning import hard_keep, soft_weights  # the formulas live with the memory operation (vismem prune)

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
    query_ids = np.asarray(query_ids).astype(str)
    nb_ids = np.asarray(neighbour_ids).astype(str)
    nb_labels = np.asarray(neighbour_labels)
    if nb_ids.shape != nb_labels.shape or nb_ids.shape[0] != len(query_ids):
        raise ValueError("neighbour ids and labels must be (Q, K) for the Q queries")
    if nb_ids.shape[1] < k + 1:
        raise ValueError(f"search at least k + 1 = {k + 1} neighbours so the self-match can be dropped")
    not_self = nb_ids != query_ids[:, None]
    # The first k neighbours that are not the query itself (stable: keeps best-first order).
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(nb_ids, order, axis=1)
    labels = np.take_along_axis(nb_labels, order, axis=1)
    wrong = (labels != np.asarray(query_labels)[:, None]) & (labels >= 0) & (ids != "")
    items = np.asarray(item_ids).astype(str)
    position = {item: i for i, item in enumerate(items)}
    counts = np.zeros(len(items), dtype=np.int64)
    hit_ids = ids[wrong]
    idx = np.fromiter((position.get(i, -1) for i in hit_ids), dtype=np.int64, count=len(hit_ids))
    if (idx < 0).any():
        raise ValueError(f"neighbour id {hit_ids[idx < 0][0]!r} is not among the memory's items")
    np.add.at(counts, idx, 1)
    return counts
