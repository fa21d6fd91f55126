"""Routed search with a probe margin: a query visits its further k-means partitions only where they are
nearly as similar as its nearest one (``memory.partition.Router``, ``Memory.search(probe_margin=)``)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import clustered
from memory import Memory
from memory.partition import Router, check_margin
from pipelines.build import build_memory
from test_build import CLASSES, PIPE, _write


def test_router_margin_by_hand():
    # Three partitions on the axes of a plane-ish space; queries between them.
    c = np.eye(3, dtype=np.float32)
    q = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.56, 0.58]], np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r = Router(c)
    np.testing.assert_array_equal(r(q, 3), [[0, 1, 2], [0, 1, 2], [0, 2, 1]])
    # sims: [1, 0, 0], [0.8, 0.6, 0], about [0.597, 0.557, 0.577]
    np.testing.assert_array_equal(r(q, 3, 0.05), [[0, -1, -1], [0, -1, -1], [0, 2, 1]])
    np.testing.assert_array_equal(r(q, 3, 0.3), [[0, -1, -1], [0, 1, -1], [0, 2, 1]])
    np.testing.assert_array_equal(r(q, 2, 2.0), r(q, 2))
    np.testing.assert_array_equal(r(q, 1, 0.5), r(q, 1))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.floats(0.0, 0.5), st.booleans())
def test_router_margin_visits_exactly_the_partitions_within_it(seed, probe, margin, cells):
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(12 if cells else 6, 8)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    part = np.arange(12) % 6 if cells else None
    q = rng.normal(size=(20, 8)).astype(np.float32)
    r = Router(cent, part)
    plain, route = r(q, probe), r(q, probe, margin)
    sims = q @ cent.T
    per = np.stack([sims[:, part == j].max(1) for j in range(6)], 1) if cells else sims
    for i in range(len(q)):
        kept = route[i][route[i] >= 0]
        np.testing.assert_array_equal(kept, plain[i][:len(kept)])  # a prefix of the plain route
        best = per[i, plain[i][0]]
        want = [p for p in plain[i] if per[i, p] >= best - np.float32(margin)]
        assert list(kept) == want


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_margins_are_refused(bad):
    with pytest.raises(ValueError, match="probe_margin"):
        check_margin(bad)


def test_margin_on_scann_tree_shards(tmp_path):
    """Shards large enough to be ScaNN trees: a margin recovers most of what more probes give, visiting
    far fewer shards; margin 0 is one probe, a margin past any gap is P probes."""
    n, dim, shards = 48_000, 32, 6
    x, labels = clustered(n + 400, dim, 60, seed=41, noise=0.6)
    x, q = x[:n], x[n:]
    ids = np.array([f"t-{i:06d}" for i in range(n)], dtype=object)
    inputs = tmp_path / "emb"
    inputs.mkdir()
    for f in range(2):
        _write(inputs / f"part-{f}.parquet", ids[f::2], x[f::2], labels[:n][f::2] % len(CLASSES))
    out = str(tmp_path / "m")
    build_memory(str(inputs), out, num_shards=shards, class_names=CLASSES, partition="kmeans", backend="scann",
                 pipeline_args=PIPE)  # 16 cells per shard, grouped into shards of equal size
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]

    def recall(nb):
        return np.mean([len(set(g) & set(ids[t])) / 10 for g, t in zip(nb.ids, truth)])

    with Memory.open(out) as mem:
        assert all(not s.entry.params.get("brute_force") for s in mem.shards)  # trees, the real path
        part = mem.manifest.partitioning
        router = Router(part.centroids, part.cell_partitions)
        one, three = mem.search(q, 10, probe_shards=1), mem.search(q, 10, probe_shards=3)
        np.testing.assert_array_equal(mem.search(q, 10, probe_shards=3, probe_margin=0.0).ids, one.ids)
        np.testing.assert_array_equal(mem.search(q, 10, probe_shards=3, probe_margin=2.0).ids, three.ids)
        found = {m: recall(mem.search(q, 10, probe_shards=3, probe_margin=m)) for m in (0.02, 0.05, 0.1)}
        visits = {m: (router(q, 3, m) >= 0).sum(1).mean() for m in found}
        # every shard within the margin, no probe count: the same as a large P with it
        np.testing.assert_array_equal(mem.search(q, 10, probe_margin=0.05).ids,
                                      mem.search(q, 10, probe_shards=shards, probe_margin=0.05).ids)
        with pytest.raises(ValueError, match="probe_margin"):
            mem.search(q, 10, probe_shards=2, probe_margin=-1.0)
    r1, r3 = recall(one), recall(three)
    assert r1 < r3, (r1, r3)
    assert r1 <= found[0.02] <= found[0.05] <= found[0.1] <= r3 + 1e-9, (r1, found, r3)
    assert visits[0.1] < 2.5 and found[0.1] >= r1 + 0.7 * (r3 - r1), (visits, found, r1, r3)
