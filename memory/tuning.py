"""Search settings tuned to a recall target, measured against brute force on a sample of queries.

A shard built with default ScaNN settings can fall well short of useful recall (200,000 clustered
64-d items: recall@10 0.896 in one shard, 0.710 in four hashed shards), or search far more than it
needs. So every build, add and compact measures each shard: queries are a sample of the shard's
own items, each moved off its item by noise of half the typical distance between an item and its
nearest neighbour and left out of its own results (a real query has no copy in the memory), plus
any sample of real queries the user passes. Their true neighbours come from brute force over the
float32 vectors. The cheapest (leaves searched, candidates reordered) pair on a ladder around the
defaults whose recall@10 and recall@50 both reach the target wins: votes read k = 50 neighbours,
and recall@10 alone let a 30,000-item shard search 2 of 173 leaves at 98.7% label agreement where
its defaults (9) had 99.7%. When no pair reaches it (a quantised mode's recall has a ceiling), the
cheapest within ``PLATEAU`` of the best. Cost is the bytes a query touches: the hashing codes of
the leaves searched plus the reorder data of the candidates (:func:`cost`). Pure: searches are
callables.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

SAMPLE = 1000  # queries drawn from the shard's items (and at most as many user queries)
K = 10  # the recall the target names: recall@10
VOTE_K = 50  # ... and the depth votes read: both recall@10 and recall@50 must reach the target
PLATEAU = 0.005  # an unreachable target settles for the cheapest recall this close to the best
_LEAF_STEPS = (0.125, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_REORDER_STEPS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Tuned:
    """The chosen settings and the recall@10 and recall@50 they reached on the tuning queries."""

    leaves: int | None
    reorder: int | None
    recall: float
    recall_at_50: float
    queries: int
    reached: bool
    tried: int

    def params(self, target: float) -> dict:
        """The entries a shard's manifest params record."""
        out = {"recall": round(self.recall, 4), "recall_at_50": round(self.recall_at_50, 4),
               "target_recall": target, "tuning_queries": self.queries}
        if self.leaves is not None:
            out["num_leaves_to_search"] = int(self.leaves)
        if self.reorder is not None:
            out["reorder"] = int(self.reorder)
        return out


def normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def sample_queries(x: np.ndarray, exact: Callable, *, sample: int = SAMPLE, extra=None,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(queries, source rows)``: ``sample`` of the rows ``x``, each moved by noise of half the median
    nearest-neighbour distance (measured with ``exact(queries, k) -> rows``), then up to ``sample``
    rows of ``extra`` (source -1). A query's source is left out of its truth and results
    (:func:`without_source`): a real query has no copy in the memory."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
    base = x[pick]
    if len(x) > 1:
        nearest = exact(base, 2)[:, 1]  # [:, 0] is the item itself (or an equal one)
        gap = float(np.median(np.linalg.norm(base - x[nearest], axis=1)))
    else:
        gap = 0.0
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise *= 0.5 * gap / np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    queries, sources = normalised(base + noise), pick.astype(np.int64)
    if extra is not None and len(extra):
        extra = np.asarray(extra, np.float32)
        if extra.ndim != 2 or extra.shape[1] != x.shape[1]:
            raise ValueError(f"tuning queries must have shape (n, {x.shape[1]}), got {np.shape(extra)}")
        take = np.sort(rng.choice(len(extra), size=min(sample, len(extra)), replace=False))
        queries = np.concatenate([queries, normalised(extra[take])])
        sources = np.concatenate([sources, np.full(len(take), -1, np.int64)])
    return queries, sources


def without_source(rows: np.ndarray, sources: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` of each query's ``rows`` other than its source row (padding -1 at the end)."""
    keep = rows != sources[:, None]
    first = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(keep, first, 1), np.take_along_axis(rows, first, 1), -1)


def recalls(got: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(recall@10, recall@all of truth's columns)`` of result rows ``got`` (best first)."""
    k = min(K, truth.shape[1])
    return recall(got[:, :k], truth[:, :k]), recall(got, truth)


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |got ∩ truth| / |truth| (rows; padding -1 in ``got`` never matches)."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(g[g >= 0], t, assume_unique=False)) for g, t in zip(got[:, :k], truth))
    return hits / truth.size


def ladder(params: dict, n: int, fixed: dict) -> list[tuple[int | None, int | None]]:
    """(leaves, reorder) pairs around the defaults in ``params``; a knob in ``fixed`` keeps its value."""
    total, base = int(params["num_leaves"]), int(params["num_leaves_to_search"])
    if "num_leaves_to_search" in fixed:
        leaves = [int(fixed["num_leaves_to_search"])]
    else:
        leaves = sorted({min(total, max(1, round(base * s))) for s in _LEAF_STEPS} | {total})
    r0 = int(params.get("reorder") or 0)
    if r0 == 0:
        reorders = [None]  # nothing to reorder on (codes)
    elif "reorder" in fixed:
        reorders = [int(fixed["reorder"])]
    else:
        reorders = sorted({min(n, max(K, r0 * s)) for s in _REORDER_STEPS})
    return [(lv, r) for lv in leaves for r in reorders]


def cost(leaves: int | None, reorder: int | None, *, n: int, num_leaves: int, code_bytes: float,
         reorder_bytes: float) -> float:
    """Bytes one query touches: codes of the items in the leaves searched, reorder data of the candidates."""
    scanned = n * (leaves or num_leaves) / max(num_leaves, 1)
    return scanned * code_bytes + (reorder or 0) * reorder_bytes


def tune(search: Callable, queries: np.ndarray, truth: np.ndarray, pairs, target: float,
         cost_of: Callable) -> Tuned:
    """The cheapest pair (by ``cost_of(leaves, reorder)``) whose ``search(queries, leaves, reorder) -> rows``
    reaches ``target`` recall against ``truth``, at 10 and at all of truth's columns; else the cheapest
    within ``PLATEAU`` of the best (the lower of the two recalls is a pair's score)."""
    pairs = sorted(pairs, key=lambda p: (p[0] or 0, p[1] or 0))
    best, fallback, tried, met_leaves, seen = None, None, 0, set(), []
    for leaves, reorder in pairs:
        c = cost_of(leaves, reorder)
        if leaves in met_leaves or (best is not None and c >= best[0]):
            continue  # a larger reorder at these leaves, or anything dearer than the choice, cannot win
        r10, r50 = recalls(search(queries, leaves, reorder), truth)
        r = min(r10, r50)
        tried += 1
        seen.append((c, r, leaves, reorder, r10, r50))
        if fallback is None or r > fallback[1] + 1e-9:
            fallback = seen[-1]
        if r >= target:
            met_leaves.add(leaves)
            best = seen[-1]
    if best is None:  # out of reach (a quantised mode's ceiling): the cheapest pair near the best recall
        best = min((t for t in seen if t[1] >= fallback[1] - PLATEAU), key=lambda t: t[0])
    c, r, leaves, reorder, r10, r50 = best
    return Tuned(leaves, reorder, r10, r50, len(queries), r >= target, tried)


def reorder_bytes(mode: str, dim: int) -> float:
    """Bytes of reorder data per candidate in each storage mode's ScaNN searcher."""
    return {"float32": 4 * dim, "float16": 2 * dim, "int8": dim, "codes": 0}[mode]


def tune_index(index, x: np.ndarray, exact: Callable, *, target: float, fixed: dict | None = None,
               extra=None) -> dict:
    """Measure (and, for a ScaNN tree, tune) a built ``index`` over rows ``x`` against ``exact(queries, k) -> rows``.

    Returns the entries to record in the shard's params: ``recall`` and ``recall_at_50`` (on the
    tuning queries), ``target_recall``, ``tuning_queries`` and, for a tree, the chosen
    ``num_leaves_to_search`` and ``reorder``. Knobs in ``fixed`` (the user's overrides) are kept.
    """
    p = getattr(index, "params", None) or {}
    n, dim = x.shape
    queries, sources = sample_queries(x, exact, extra=extra)
    k = min(VOTE_K, n - 1) if n > 1 else 1
    truth = without_source(exact(queries, k + 1), sources, k)
    if index.name == "scann" and not p.get("brute_force"):
        pairs = ladder(p, n, fixed or {})
        bits = 8 if p.get("hash_type") == "lut256" else 4  # 256 or 16 centres per block
        code_bytes = dim / max(int(p["dimensions_per_block"]), 1) * bits / 8
        rb = reorder_bytes(p.get("storage", "float32"), dim)

        def cost_of(leaves, reorder):
            return cost(leaves, reorder, n=n, num_leaves=int(p["num_leaves"]), code_bytes=code_bytes,
                        reorder_bytes=rb)
    else:
        pairs, cost_of = [(None, None)], (lambda leaves, reorder: 0.0)

    def search(q, leaves, reorder):
        return without_source(index.search(q, k + 1, leaves_to_search=leaves, reorder=reorder)[1], sources, k)

    return tune(search, queries, truth, pairs, target, cost_of).params(target)
