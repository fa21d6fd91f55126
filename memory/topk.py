"""Pure top-k helpers: order candidates best first with a deterministic tie rule, merge shard lists.

The order everywhere is: higher similarity first, and among equal similarities the smaller item id
first. Padding (a shard with fewer than k items) has similarity ``-inf`` and sorts last.

The merges work on numbers: similarities and integer item keys. Ids (strings) are only looked at
for the rows where similarities tie, which are rare in real data, and only ``k + 1`` candidates of
a row are ever sorted (``argpartition`` picks them), so a merge of S lists of k costs about one
pass over the ``S * k`` similarities.
"""
from __future__ import annotations

import numpy as np


def order_best_first(sims: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Column order ``(Q, M)`` sorting each row by similarity descending, then by ``keys`` ascending.

    ``keys`` are the tie-breakers (item ids, or row numbers within one shard). Rows that arrive
    sorted (a searcher's own output) are not sorted again; the tie sort only runs on the rows that
    actually contain equal similarities, which are rare in real data.
    """
    q, m = sims.shape
    if m < 2:
        return np.zeros((q, m), np.int64)
    if (sims[:, 1:] <= sims[:, :-1]).all():  # already best first: only ties can need work
        order = np.broadcast_to(np.arange(m), (q, m)).copy()
        s = sims
    else:
        order = np.argsort(-sims, axis=1, kind="stable")
        s = np.take_along_axis(sims, order, axis=1)
    tied_rows = _tied_rows(s)
    if len(tied_rows):
        order[tied_rows] = np.lexsort((keys[tied_rows], -sims[tied_rows]), axis=1)
    return order


def _tied_rows(s: np.ndarray) -> np.ndarray:
    """Rows of a best-first ``s`` holding two equal finite similarities next to each other."""
    if s.shape[1] < 2:
        return np.zeros(0, np.int64)
    return np.flatnonzero(((s[:, 1:] == s[:, :-1]) & np.isfinite(s[:, 1:])).any(axis=1))


def select_best(sims: np.ndarray, k: int, tie_keys) -> np.ndarray:
    """Columns ``(Q, min(k, M))`` of each row's k best candidates, best first, ties by tie key.

    ``tie_keys(rows)`` returns the ``(len(rows), M)`` tie-breakers (ids) of those rows; it is only
    called for rows where equal similarities could change the answer.
    """
    q, m = sims.shape
    if m > k:  # the k + 1 best, unordered, then sorted: k + 1 shows whether a tie crosses the cut
        cand = np.argpartition(-sims, k, axis=1)[:, :k + 1]
        order = np.take_along_axis(cand, np.argsort(-np.take_along_axis(sims, cand, 1), axis=1), 1)
    else:
        order = np.argsort(-sims, axis=1, kind="stable")
    tied = _tied_rows(np.take_along_axis(sims, order, 1))
    if len(tied):
        # Rare: equal similarities among the best. Sort those rows in full by (similarity, key).
        full = np.lexsort((tie_keys(tied), -sims[tied]), axis=1)
        order[tied] = full[:, :order.shape[1]]
    return order[:, :k]


def merge_keys(results, k: int, ids_of):
    """Merge per-shard ``(sims (Q, k_i), keys (Q, k_i))`` lists into ``(sims, keys)`` ``(Q, min(k, sum k_i))``.

    ``keys`` are integer item keys unique in the memory (-1: padding); ``ids_of(keys)`` gives the ids
    that break ties (called for tied rows only). Nothing but the two numeric arrays is moved.
    """
    if not results:
        raise ValueError("merge_keys needs at least one shard result")
    sims = results[0][0] if len(results) == 1 else np.concatenate([r[0] for r in results], axis=1)
    keys = results[0][1] if len(results) == 1 else np.concatenate([r[1] for r in results], axis=1)
    order = select_best(sims, k, lambda rows: ids_of(keys[rows]))
    return np.take_along_axis(sims, order, 1), np.take_along_axis(keys, order, 1)


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
    order = select_best(cols[0], k, lambda rows: cols[1][rows])
    return tuple(np.take_along_axis(c, order, axis=1) for c in cols)


def first_cut(k: int, num_shards: int) -> int:
    """How many candidates to ask each of ``num_shards`` hash shards for first, for an exact top-k.

    A shard holds a random share of the items, so the number of the global top-k it holds is about
    Binomial(k, 1/S): the cut is its mean plus four standard deviations (and 2), e.g. 29 of
    k = 100 over 8 shards; :func:`merge_with_refetch` asks again where a shard may hold more.
    """
    mean = k / max(num_shards, 1)
    return min(k, int(np.ceil(mean + 4 * np.sqrt(mean))) + 2)


def merge_with_refetch(results, k: int, refetch, ids_of, map_fn=map):
    """The exact global top-k from per-shard lists cut short, searching again only where needed.

    Args:
        results: per shard ``(sims (Q, c), keys (Q, c))``, best first, each shard's exact top ``c < k``.
        refetch: ``refetch(i, rows) -> (sims, keys)`` ``(len(rows), k)``: shard ``i``'s top k for
            the queries ``rows``.
        ids_of: tie-breakers by key, as in :func:`merge_keys`.
        map_fn: runs the refetches (``executor.map``-like: function, list of items).

    A shard's unseen items are no better than its ``c``-th candidate; where that candidate is worse
    than the merged k-th (strictly: equal ones might win on id), nothing unseen can enter, so the
    merge is already exact. Queries where some shard fails that test are searched again for k in
    every shard, so all of one query's candidates come from one batch (equal vectors in two shards
    then score bit-equal, and their tie is broken by id as everywhere).
    """
    sims, keys = merge_keys(results, k, ids_of)
    kth = sims[:, k - 1] if sims.shape[1] >= k else np.full(len(sims), -np.inf, np.float32)
    unsafe = np.zeros(len(sims), bool)
    for s, _ in results:
        unsafe |= np.isfinite(s[:, -1]) & (s[:, -1] >= kth)
    sims, keys = _widen(sims, k), _widen(keys, k, -1)
    redo = np.flatnonzero(unsafe)
    if len(redo):
        again = list(map_fn(lambda i: refetch(i, redo), list(range(len(results)))))
        sims[redo], keys[redo] = (_widen(a, k, f) for a, f in zip(merge_keys(again, k, ids_of), (-np.inf, -1)))
    return sims, keys


def _widen(a, k, fill=-np.inf):
    """``a`` with at least ``k`` columns (padding appended), as a new array."""
    if a.shape[1] >= k:
        return a[:, :k].copy()
    return np.concatenate([a, np.full((len(a), k - a.shape[1]), fill, a.dtype)], axis=1)


def pad_results(sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sims, rows)`` cut or padded to ``k`` columns: padding is similarity ``-inf``, row ``-1``."""
    q, got = sims.shape
    if got >= k:
        return sims[:, :k], rows[:, :k]
    pad_s = np.full((q, k - got), -np.inf, dtype=np.float32)
    pad_r = np.full((q, k - got), -1, dtype=np.int64)
    return np.concatenate([sims, pad_s], axis=1), np.concatenate([rows, pad_r], axis=1)
