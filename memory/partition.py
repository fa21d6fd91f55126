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
    x = np.asarray(sample, dtype=np.float64)
    k = int(num_shards)
    if k < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"k-means needs at least {k} sample rows (one per shard), got shape {x.shape}")
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(len(x))]]
    best = x @ centroids[0]
    for _ in range(1, k):
        gap = np.maximum(1.0 - best, 0.0) ** 2  # squared chordal distance / 2 on the unit sphere
        p = gap / gap.sum() if gap.sum() > 0 else None
        c = x[rng.choice(len(x), p=p)]
        centroids.append(c)
        best = np.maximum(best, x @ c)
    c = np.stack(centroids)
    for _ in range(iterations):
        sims = x @ c.T
        assign = sims.argmax(1)
        new = np.zeros_like(c)
        np.add.at(new, assign, x)
        counts = np.bincount(assign, minlength=k)
        for j in np.flatnonzero(counts == 0):
            far = int(np.argmin(sims[np.arange(len(x)), assign]))
            new[j] = x[far]
            assign[far] = j
        norms = np.linalg.norm(new, axis=1, keepdims=True)
        new = new / np.where(norms > 0, norms, 1.0)
        if np.allclose(new, c, atol=1e-7):
            c = new
            break
        c = new
    return c.astype(np.float32)


def kmeans_partition(embeddings, centroids) -> np.ndarray:
    """Shard of each (L2-normalised) row: its most similar centroid, ties to the lower shard."""
    return (np.asarray(embeddings, np.float32) @ np.asarray(centroids, np.float32).T).argmax(1).astype(np.int64)


def nearest_partitions(queries, centroids, probe: int) -> np.ndarray:
    """``(Q, probe)`` partition numbers nearest each query, nearest first (the routing of a search)."""
    c = np.asarray(centroids, np.float32)
    probe = int(min(max(probe, 1), len(c)))
    sims = np.asarray(queries, np.float32) @ c.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :probe]
