"""The build's pure cores, without Beam: row validation, duplicate ids, k-means partitioning."""
import numpy as np
import pytest

from conftest import clustered
from memory import items
from memory.partition import group_cells, kmeans_partition, nearest_partitions, train_kmeans, train_router
from pipelines import validate


def _batch(ids, emb, labels):
    n = len(ids)
    return {"file": "f.parquet", "rows": np.arange(n), "ids": np.array(ids, dtype=object),
            "embeddings": np.asarray(emb, np.float32), "labels": np.array(labels),
            "label_source": np.full(n, "human", dtype=object), "confidence": np.ones(n, np.float32),
            "source": np.full(n, "s", dtype=object), "uri": np.full(n, "", dtype=object)}


def test_validate_batch_keeps_good_rows_and_names_each_bad_one():
    e = np.eye(4)
    batch = _batch(["ok", "nan", "zero", "long", "nolabel", "big", "gone", "ok2"],
                   [e[0], [np.nan, 0, 0, 0], [0, 0, 0, 0], 3 * e[1], e[2], e[3], e[0], 0.999 * e[1]],
                   [0, 1, 1, 1, -1, 7, 1, 2])
    good, dead = validate.validate_batch(batch, dim=4, num_classes=3, forgotten={"gone"})
    assert good["ids"].tolist() == ["ok", "ok2"]
    np.testing.assert_allclose(np.linalg.norm(good["embeddings"], axis=1), 1, atol=1e-7)
    reasons = {d["id"]: d["reason"] for d in dead}
    assert reasons == {
        "nan": "NaN or infinite values in the embedding",
        "zero": "all-zero embedding (no direction)",
        "long": "norm 3 is not 1 within 0.01: the embedding is not L2-normalised",
        "nolabel": "no label (-1): a memory item needs a class",
        "big": "label 7 outside the 3 class names",
        "gone": "id was removed from this memory (unlearning); add it back only with --readmit",
    }
    assert [d["row"] for d in dead] == [1, 2, 3, 4, 5, 6]
    good, dead = validate.validate_batch(batch, dim=4, num_classes=8, norm_tolerance=None,
                                         forgotten={"gone"}, readmit=True)
    assert good["ids"].tolist() == ["ok", "long", "big", "gone", "ok2"]
    good, dead = validate.validate_batch(batch, dim=5, num_classes=3)
    assert len(good["ids"]) == 0 and {d["reason"] for d in dead} == {"dimension 4 differs from the memory's 5"}


def test_duplicates_and_existing_ids_meet_in_one_bucket():
    ids = ["a", "b", "c", "a", "d"]
    buckets = validate.id_buckets(ids, 3)
    assert sorted(i for b in buckets.values() for i in b) == sorted(ids)
    assert all(validate.id_buckets([i], 3).popitem()[0] == b for b, members in buckets.items() for i in members)
    assert items.duplicate_reasons(ids, ["d", "z"]) == {
        "a": "duplicate id: 2 input rows share it (all are rejected)",
        "d": "id already in the memory (remove it first to replace it)",
    }


def test_kmeans_partition_is_deterministic_and_routes_to_nearest():
    x, labels = clustered(2000, 16, 8, seed=3, noise=0.1)
    c1, c2 = train_kmeans(x, 8, seed=0), train_kmeans(x, 8, seed=0)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1, atol=1e-6)
    part = kmeans_partition(x, c1)
    assert len(np.unique(part)) == 8
    # Tight, well separated blobs: each blob lands whole in one cell.
    assert all(len(np.unique(part[labels == b])) == 1 for b in range(8))
    route = nearest_partitions(x[:5], c1, 3)
    assert route.shape == (5, 3) and (route[:, 0] == part[:5]).all()


def test_router_groups_fine_cells_into_balanced_shards_and_routes_by_the_nearest_cell():
    x, blob = clustered(6000, 16, 64, seed=5, noise=0.1)
    centroids, cell_part = train_router(x, 4, 64, seed=0)
    assert centroids.shape == (64, 16) and cell_part.shape == (64,)
    again = train_router(x, 4, 64, seed=0)
    np.testing.assert_array_equal(again[0], centroids)
    np.testing.assert_array_equal(again[1], cell_part)
    part = kmeans_partition(x, centroids, cell_part)
    # Every shard holds items, none more than the 10% slack over an equal share (plus one cell).
    sizes = np.bincount(part, minlength=4)
    assert sizes.min() > 0 and sizes.max() <= 1.1 * len(x) / 4 + np.bincount(blob).max()
    # An item's shard is the shard of its nearest cell; a blob is never cut across shards.
    nearest_cell = (x @ centroids.T).argmax(1)
    np.testing.assert_array_equal(part, cell_part[nearest_cell])
    assert all(len(np.unique(part[blob == b])) == 1 for b in range(64))
    # Routing ranks shards by their most similar cell: the first shard is the item's own.
    route = nearest_partitions(x, centroids, 2, cell_part)
    assert route.shape == (len(x), 2) and (route[:, 0] == part).all() and (route[:, 0] != route[:, 1]).all()
    sims = x[:3] @ centroids.T
    shard_best = np.stack([sims[:, cell_part == j].max(1) for j in range(4)], axis=1)
    np.testing.assert_array_equal(route[:3], np.argsort(-shard_best, axis=1, kind="stable")[:, :2])
    # A partition without cells (its items all compacted away, say) is never visited before the others.
    sparse = nearest_partitions(x[:50], centroids[:3], 3, [2, 0, 2])
    assert (sparse[:, 2] == 1).all() and set(sparse[:, 0]) <= {0, 2}


def test_group_cells_identity_when_one_cell_per_shard_and_rejects_too_few_cells():
    c = train_kmeans(clustered(500, 8, 4, seed=1)[0], 4)
    np.testing.assert_array_equal(group_cells(c, [1, 1, 1, 1], 4), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="4 k-means cells cannot fill 5 shards"):
        group_cells(c, [1, 1, 1, 1], 5)
    with pytest.raises(ValueError, match=r"k-means cells \(2\) must be at least the number of shards \(4\)"):
        train_router(c, 4, 2)
