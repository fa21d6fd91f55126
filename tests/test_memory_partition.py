"""memory.partition: stable hash shards, k-means cells, their grouping into shards, and query routing."""
import hashlib

import numpy as np
import pytest

from conftest import clustered
from memory.partition import (default_cells, group_cells, hash_partition, kmeans_partition,
                              nearest_partitions, train_kmeans, train_router)


def test_hash_partition_is_the_documented_stable_hash():
    ids = [f"item-{i}" for i in range(200)]
    want = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") % 7 for i in ids]
    got = hash_partition(ids, 7)
    assert got.tolist() == want
    assert set(got.tolist()) == set(range(7))  # 200 ids fill every shard
    assert hash_partition(ids, 1).tolist() == [0] * 200
    with pytest.raises(ValueError, match="num_shards must be >= 1"):
        hash_partition(ids, 0)


def test_kmeans_finds_separated_clusters_deterministically():
    x, labels = clustered(600, 8, 4, seed=3, noise=0.05)
    c = train_kmeans(x, 4, seed=0)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(c, train_kmeans(x, 4, seed=0))
    assign = kmeans_partition(x, c)
    # Each true cluster maps to exactly one cell and vice versa.
    pairs = {(int(a), int(b)) for a, b in zip(labels, assign)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4 and len({b for _, b in pairs}) == 4
    with pytest.raises(ValueError, match="at least 5 sample rows"):
        train_kmeans(x[:4], 5)


def test_group_cells_balances_shards_and_keeps_every_shard_filled():
    rng = np.random.default_rng(0)
    c = rng.standard_normal((40, 6))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    counts = rng.integers(1, 100, 40)
    groups = group_cells(c, counts, 4, slack=0.1)
    load = np.bincount(groups, weights=counts, minlength=4)
    assert set(groups.tolist()) == {0, 1, 2, 3}
    # Greedy under capacity; a cell that fits nowhere goes to the emptiest shard, adding at most one cell.
    assert load.max() <= 1.1 * counts.sum() / 4 + counts.max()
    assert group_cells(c[:4], counts[:4], 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot fill 5 shards"):
        group_cells(c[:4], counts[:4], 5)


def test_routing_agrees_with_brute_force():
    x, _ = clustered(800, 8, 6, seed=9)
    centroids, cell_parts = train_router(x, 3, cells=12)
    assert centroids.shape == (12, 8) and sorted(set(cell_parts.tolist())) == [0, 1, 2]
    q, _ = clustered(30, 8, 6, seed=10)
    sims = q @ centroids.T
    best = np.array([[sims[i, cell_parts == p].max() for p in range(3)] for i in range(30)])
    want = np.argsort(-best, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(nearest_partitions(q, centroids, 2, cell_parts), want)
    np.testing.assert_array_equal(kmeans_partition(q, centroids, cell_parts), cell_parts[sims.argmax(1)])
    assert nearest_partitions(q, centroids, 99, cell_parts).shape == (30, 3)  # capped at the partitions
    with pytest.raises(ValueError, match="must be at least the number of shards"):
        train_router(x, 3, cells=2)


def test_default_cells():
    assert default_cells(4, 100_000) == 64
    assert default_cells(4, 1000) == 20
    assert default_cells(4, 10) == 4


def test_the_kmeans_sample_grows_with_the_cells_it_trains():
    """256 rows per cell, within [100,000, 1,000,000]: a 10M-item memory's 1,280 cells get 327,680 rows
    (78 each with the old fixed 100,000); small memories keep 100,000; a billion-item one is capped."""
    from memory.partition import default_cells, default_sample

    assert default_sample(2) == default_sample(20) == 100_000
    assert default_sample(80) == 327_680 and default_cells(80, default_sample(80)) == 1_280
    assert default_sample(8, cells=2_048) == 524_288
    assert default_sample(7_212) == 1_000_000 and default_cells(7_212, 1_000_000) == 20_000
