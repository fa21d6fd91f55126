"""Removal on ScaNN trees: k live neighbours, recall of a clean tree, bounded memory, every host.

Sizes are what the real paths need: 60,000 items in one shard (a tree: shards under 5,000 items
use ScaNN's brute force, where over-fetching already worked), 20 classes of about 3,000 items, so
removing one class empties about 12 of the tree's 245 leaves: the leaves a query next to that class
searches by default. Before the fix every such query came back padded or with recall@50 near 0.2.
"""
import tracemalloc

import numpy as np
import pytest
import ray

from conftest import clustered, oracle_topk
from memory import Memory, shard, write_memory
from memory.mutations import remove_items

CLASSES = [f"c{i}" for i in range(20)]
K = 50


def _unit(v):
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _brute(q, x, ids, rows, k=K):
    return ids[rows[np.argsort(-(q @ x[rows].T), axis=1)[:, :k]]]


def _recall(got, want):
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A 60,000-item tree memory (v1), class c3 removed (v2), the queries next to c3, and the
    recall@50 the clean v1 tree reaches on those queries against brute force (measured here)."""
    x, labels = clustered(60_000, 32, 20, seed=11)
    ids = np.array([f"v{i:06d}" for i in range(len(x))], dtype=object)
    root = str(tmp_path_factory.mktemp("tree") / "m")
    manifest = write_memory(root, x, labels, ids, backend="scann", class_names=CLASSES)
    assert not manifest.shards[0].params["brute_force"]  # a real tree, by size alone
    dead = labels == 3
    q = _unit(x[dead].mean(axis=0) + 0.3 * np.random.default_rng(11).standard_normal((200, 32)))
    with Memory.open(root) as mem:
        clean = _recall(mem.search(q, K).ids, _brute(q, x, ids, np.arange(len(x))))
    remove_items(root, label="c3")
    return dict(root=root, x=x, labels=labels, ids=ids, dead=dead, q=q, clean=clean)


def test_removed_class_still_gives_k_live_neighbours_at_clean_tree_recall(tree, tmp_path):
    x, ids, dead, q = tree["x"], tree["ids"], tree["dead"], tree["q"]
    live = np.flatnonzero(~dead)
    with Memory.open(tree["root"], 2) as mem:
        assert len(mem) == len(live)
        nb = mem.search(q, K)
    # Before the fix: recall@50 0.38 here (over-fetch re-read the emptied leaves); other builds
    # of this tree padded every slot, as in issue 11.
    assert (nb.labels != -1).all() and (nb.ids != "").all(), int((nb.labels == -1).sum())
    assert not np.isin(nb.ids, ids[dead]).any()
    want = _brute(q, x, ids, live)
    removed = _recall(nb.ids, want)
    # A clean tree of the same live items (rebuilt without c3) is the other yardstick.
    rebuilt_root = str(tmp_path / "rebuilt")
    write_memory(rebuilt_root, x[live], tree["labels"][live], ids[live], backend="scann", class_names=CLASSES)
    with Memory.open(rebuilt_root) as mem:
        rebuilt_ids = mem.search(q, K).ids
    rebuilt = _recall(rebuilt_ids, want)
    # The clean tree of the same items is the bound: measured 0.875 rebuilt, 0.92 after removal
    # (untuned trees: 0.75-0.78 and 0.79-0.81 over three seeds). Version 1 answered the easier
    # question (c3's own items were there): 0.97, or 0.78-0.81 untuned.
    assert removed >= rebuilt - 0.03, (removed, rebuilt)
    assert removed >= tree["clean"] - 0.1, (removed, tree["clean"])
    # Both are approximate: the lists agree about as well as either one matches brute force.
    assert _recall(nb.ids, rebuilt_ids) >= rebuilt - 0.05


def test_random_removal_keeps_recall_and_old_versions_keep_their_items(tree):
    x, ids, dead = tree["x"], tree["ids"], tree["dead"]
    rng = np.random.default_rng(12)
    gone = rng.choice(np.flatnonzero(~dead), len(x) // 10, replace=False)  # 10% more, at random
    with Memory.open(tree["root"], 2) as older:  # opened before the removal: must not change
        before = older.search(x[gone[:20]], 1).ids[:, 0]
        remove_items(tree["root"], ids=list(ids[gone]))
        np.testing.assert_array_equal(older.search(x[gone[:20]], 1).ids[:, 0], before)
    np.testing.assert_array_equal(before, ids[gone[:20]])
    live = np.setdiff1d(np.flatnonzero(~dead), gone)
    q = _unit(x[rng.choice(live, 200)] + 0.05 * rng.standard_normal((200, 32)))
    with Memory.open(tree["root"], 1) as v1:
        clean = _recall(v1.search(q, K).ids, _brute(q, x, ids, np.arange(len(x))))
        assert v1.search(x[gone[:5]], 1).ids[:, 0].tolist() == ids[gone[:5]].tolist()
    with Memory.open(tree["root"]) as mem:
        assert len(mem) == len(live)
        nb = mem.search(q, K)
        assert not np.isin(mem.search(x[gone[:200]], K).ids, ids[gone]).any()
    assert (nb.labels != -1).all() and not np.isin(nb.ids, ids[~np.isin(np.arange(len(x)), live)]).any()
    # Measured here: clean 0.59, after removing 15% of the items 0.61.
    assert _recall(nb.ids, _brute(q, x, ids, live)) >= clean - 0.05


def test_ray_hosted_tree_shard_removes_the_same(tree):
    q = tree["q"][:50]
    with Memory.open(tree["root"], 2) as mem:
        want = mem.search(q, K)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with Memory.open(tree["root"], 2, hosts="ray") as remote:
            assert len(remote) == int((~tree["dead"]).sum())
            got = remote.search(q, K)
    finally:
        ray.shutdown()
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.sims, want.sims)


def test_over_fetch_memory_is_bounded_with_many_tombstones(tmp_path, monkeypatch):
    # Exact backend: it cannot delete, so it over-fetches past removed items. Every query sits at the
    # removed class, so each needs k + 2,000 candidates; before, that was fetched for the whole batch
    # at once: 1,000 x 2,010 x (4 + 8) bytes, 120 MB with the index's sort buffers.
    x, labels = clustered(8_000, 16, 4, seed=21)
    ids = np.array([f"e{i:05d}" for i in range(len(x))], dtype=object)
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, class_names=CLASSES[:4])
    remove_items(root, label="c1")
    dead = labels == 1
    q = _unit(x[dead].mean(axis=0) + 0.2 * np.random.default_rng(21).standard_normal((1000, 16)))
    monkeypatch.setattr(shard, "LIVE_SEARCH_BUDGET", 1 << 15)  # candidates held at once
    with Memory.open(root) as mem:
        nb = mem.search(q, 10)  # the first search loads lazy parts (the exact tie kernel imports torch)
        tracemalloc.start()
        again = mem.search(q, 10)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    np.testing.assert_array_equal(again.ids, nb.ids)
    bound = len(q) * int(dead.sum()) * 8  # one int64 per query per removed item: 16 MB
    assert peak < bound / 4, (peak, bound)  # measured here: 2.2 MB, set by the budget alone
    assert not np.isin(nb.ids, ids[dead]).any() and (nb.labels != -1).all()
    live = np.flatnonzero(~dead)
    np.testing.assert_array_equal(nb.ids[:50], oracle_topk(q[:50], x[live], ids[live], 10)[0])
