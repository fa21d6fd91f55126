"""Shard assignment: which shard an item lives in."""
from __future__ import annotations

import hashlib

import numpy as np


def hash_partition(ids, num_shards: int) -> np.ndarray:
    """Shard of each id by a stable hash (the same on every machine, run and Python version)."""
    if int(num_shards) < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") % num_shards
         for i in ids),
        dtype=np.int64,
        count=len(ids),
    )


def train_kmeans(sample, num_shards: int, *, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """Spherical k-means centroids ``(num_shards, dim)`` (unit rows) of an L2-normalised sample.

    k-means++ seeding from ``seed``, then Lloyd iterations on cosine similarity; a centroid that
    loses every point is re-seeded at the point farthest from its centroid, so no shard is empty
    by construction. The same sample and seed give the same centroids on every machine.
    """
    # float32 throughout (one copy of the sample): the sample reaches 1M rows x dim, and a float64 copy
    # was most of the k-means step's memory; sums are accumulated in float64.
    x = np.asarray(sample, dtype=np.float32)
    k = int(num_shards)
    if k < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"k-means needs at least {k} sample rows (one per shard), got shape {x.shape}")
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(len(x))]]
    best = x @ centroids[0]
    for _ in range(1, k):
        gap = np.maximum(1.0 - best.astype(np.float64), 0.0) ** 2  # squared chordal distance / 2 on the unit sphere
        p = gap / gap.sum() if gap.sum() > 0 else None
        c = x[rng.choice(len(x), p=p)]
        centroids.append(c)
        np.maximum(best, x @ c, out=best)
    c = np.stack(centroids)
    for _ in range(iterations):
        assign, best = _nearest(x, c)
        new = np.zeros(c.shape, np.float64)
        np.add.at(new, assign, x)
        counts = np.bincount(assign, minlength=k)
        for j in np.flatnonzero(counts == 0):
            far = int(np.argmin(best))
            new[j] = x[far]
            assign[far], best[far] = j, np.inf
        norms = np.linalg.norm(new, axis=1, keepdims=True)
        new = (new / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        if np.allclose(new, c, atol=1e-6):
            c = new
            break
        c = new
    return c.astype(np.float32)


BLOCK_SIMILARITIES = 1 << 23  # similarities held at once (32 MiB of float32), whatever the cell count


def _nearest(x, c, block: int | None = None):
    """``(index, similarity)`` of each row's most similar centroid (ties to the lower one), in row blocks:
    memory stays at ``BLOCK_SIMILARITIES`` however many rows and cells. Whole, the similarities of a
    10M-item build's 327,680 sampled rows to its 1,280 cells took 1.7 GB of the k-means worker."""
    block = block or max(64, min(8192, BLOCK_SIMILARITIES // max(len(c), 1)))
    assign = np.empty(len(x), np.int64)
    best = np.empty(len(x), np.float32)
    for a in range(0, len(x), block):
        sims = x[a:a + block] @ c.T
        assign[a:a + block] = sims.argmax(1)
        best[a:a + block] = sims[np.arange(len(sims)), assign[a:a + block]]
    return assign, best


def group_cells(centroids, counts, num_shards: int, *, slack: float = 0.1) -> np.ndarray:
    """Shard of each k-means cell ``(C,)``: nearby cells together, every shard about equally full.

    Cells (fine k-means centroids, unit rows) are grouped by a spherical k-means of the cells
    themselves, then assigned greedily by (similarity to a group, descending) under a capacity of
    ``(1 + slack)`` times an equal share of ``counts`` (the cells' sample sizes), so no shard is
    overloaded; a cell that fits nowhere goes to the emptiest shard. Deterministic.
    """
    c = np.asarray(centroids, np.float64)
    n_cells, s = len(c), int(num_shards)
    if n_cells < s:
        raise ValueError(f"{n_cells} k-means cells cannot fill {s} shards; use at least one cell per shard")
    if n_cells == s:
        return np.arange(s, dtype=np.int64)
    counts = np.maximum(np.asarray(counts, np.float64), 1.0)
    groups = train_kmeans(c, s, seed=0)
    sims = c @ groups.T.astype(np.float64)
    capacity = (1.0 + slack) * counts.sum() / s
    load = np.zeros(s)
    out = np.full(n_cells, -1, np.int64)
    # Every shard first takes its most similar cell (so none is empty), then all pairs best first.
    for j in range(s):
        i = int(np.argmax(np.where(out < 0, sims[:, j], -np.inf)))
        out[i], load[j] = j, load[j] + counts[i]
    order = np.lexsort((np.arange(sims.size), -sims.ravel()))
    left = int((out < 0).sum())
    for flat in order:
        if left == 0:
            break
        i, j = divmod(int(flat), s)
        if out[i] < 0 and load[j] + counts[i] <= capacity:
            out[i], load[j], left = j, load[j] + counts[i], left - 1
    for i in np.flatnonzero(out < 0):
        j = int(np.argmin(load))
        out[i], load[j] = j, load[j] + counts[i]
    return out


CELLS_PER_SHARD = 16  # default k-means cells per shard (default_cells)
SAMPLE_ROWS_PER_CELL = 256
SAMPLE_MIN, SAMPLE_MAX = 100_000, 1_000_000


def default_sample(num_shards: int, cells: int | None = None) -> int:
    """Rows to train k-means on: 256 per cell (faiss's warning threshold is 39), at least 100,000 and at
    most 1,000,000 (one process trains them). A fixed 100,000 left a 10M-item memory's 1,280 cells
    78 rows each, and its routed queries needed 3 shards for recall 0.95 where 2.5M items needed 1."""
    return int(max(SAMPLE_MIN, min(SAMPLE_MAX, SAMPLE_ROWS_PER_CELL * (cells or CELLS_PER_SHARD * int(num_shards)))))


def default_cells(num_shards: int, sample_rows: int) -> int:
    """16 cells per shard, while each cell keeps about 50 sample rows to train on; never below one per shard."""
    return int(max(num_shards, min(CELLS_PER_SHARD * num_shards, sample_rows // 50)))


def train_router(sample, num_shards: int, cells: int | None = None, *, seed: int = 0):
    """k-means routing for ``num_shards`` shards: ``(centroids (C, dim), cell_partitions (C,))``.

    With ``cells`` > ``num_shards`` each shard holds several fine cells (:func:`group_cells`); a
    query is then routed by its nearest cells, which follows the data far more closely than one
    centroid per shard (a shard's single centroid says little about its border). ``cells=None``
    or equal to ``num_shards``: one cell per shard.
    """
    s = int(num_shards)
    c_num = s if cells is None else int(cells)
    if c_num < s:
        raise ValueError(f"k-means cells ({c_num}) must be at least the number of shards ({s})")
    centroids = train_kmeans(sample, c_num, seed=seed)
    counts = np.bincount(kmeans_partition(sample, centroids), minlength=c_num)
    return centroids, group_cells(centroids, counts, s)


def kmeans_partition(embeddings, centroids, cell_partitions=None) -> np.ndarray:
    """Shard of each (L2-normalised) row: the shard of its most similar cell, ties to the lower cell."""
    cell, _ = _nearest(np.asarray(embeddings, np.float32), np.asarray(centroids, np.float32))
    return cell if cell_partitions is None else np.asarray(cell_partitions, np.int64)[cell]


def nearest_partitions(queries, centroids, probe: int, cell_partitions=None) -> np.ndarray:
    """``(Q, probe)`` partitions nearest each query, nearest first (the routing of a search).

    A partition's similarity to a query is that of its most similar cell; ties go to the lower
    partition. ``probe`` is capped at the number of partitions. A memory keeps one :class:`Router`
    instead of calling this per search.
    """
    return Router(centroids, cell_partitions)(queries, probe)


class Router:
    """:func:`nearest_partitions` with the centroids prepared once: as float32, grouped by partition,
    so a search is one matrix product, one max per partition and a selection. Per search this was
    half of a routed query's time at 2,048 cells and 128 shards (converting the manifest's lists
    and regrouping the scores every time)."""

    def __init__(self, centroids, cell_partitions=None):
        c = np.asarray(centroids, np.float32)
        self.starts = None
        self.num_partitions = len(c)
        if cell_partitions is not None:
            part = np.asarray(cell_partitions, np.int64)
            order = np.argsort(part, kind="stable")  # cells grouped by partition, then one max per group
            c = c[order]
            self.present, self.starts = np.unique(part[order], return_index=True)
            self.num_partitions = int(part.max()) + 1
        self.centroids_t = np.ascontiguousarray(c.T)

    def __call__(self, queries, probe: int, margin: float | None = None) -> np.ndarray:
        """``(Q, probe)`` partitions per query, nearest first. With ``margin``, a query visits a further
        partition only when its similarity is within ``margin`` of the nearest one's; the slots it
        skips are -1 (see :func:`check_margin`)."""
        sims = np.asarray(queries, np.float32) @ self.centroids_t
        if self.starts is not None:
            grouped = np.maximum.reduceat(sims, self.starts, axis=1)
            if len(self.present) == self.num_partitions:
                sims = grouped
            else:  # a partition without cells is never nearest
                sims = np.full((len(grouped), self.num_partitions), -np.inf, np.float32)
                sims[:, self.present] = grouped
        probe = int(min(max(probe, 1), sims.shape[1]))
        if probe == 1:
            return sims.argmax(axis=1)[:, None]  # the first of equal maxima: the lower partition, as below
        route = np.argsort(-sims, axis=1, kind="stable")[:, :probe]
        if margin is not None:
            near = np.take_along_axis(sims, route, axis=1)
            route[near < near[:, :1] - np.float32(margin)] = -1
        return route


def check_routing(partitioning, probe_shards, margin, where: str) -> None:
    """Refuse ``probe_shards`` or a probe margin on a memory without k-means cells (``partitioning``: a
    manifest's; ``where``: the memory, named in the message)."""
    if (probe_shards is not None or margin is not None) and not partitioning.centroids:
        knob = "probe_shards" if probe_shards is not None else "probe_margin"
        raise ValueError(f"{knob} needs a k-means partitioned memory (vismem build --partition kmeans); "
                         f"{where} is partitioned by {partitioning.method!r}")


def check_margin(margin) -> float | None:
    """A probe margin: None (every query visits ``probe_shards`` partitions) or a number >= 0.

    Real embeddings straddle k-means borders: on Fashion-MNIST (8 shards) 90% of a query's true
    neighbours sit in its nearest shard. Visiting the next shards only for the queries whose
    similarity to them is within the margin of the nearest (cosine units) buys most of what a
    second and third shard give at a fraction of their cost (``benchmarks/routing.py``).
    """
    if margin is None:
        return None
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.floating, np.integer)) \
            or not np.isfinite(margin) or margin < 0:
        raise ValueError(f"probe_margin must be a finite number >= 0, got {margin!r}")
    return float(margin)
