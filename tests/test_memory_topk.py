"""memory.topk: the merge of per-shard lists equals a brute-force sort, equal similarities ordered by id."""
import numpy as np
import pytest

from memory.topk import first_cut, merge_keys, merge_topk, merge_with_refetch, order_best_first


def _oracle(sims, ids, k):
    """Python's sort on (-similarity, id): the rule the memory promises."""
    out = []
    for s_row, id_row in zip(sims, ids):
        pairs = sorted(zip(-s_row, id_row))[:k]
        out.append([i for _, i in pairs])
    return np.array(out, dtype=object)


@pytest.mark.parametrize("seed", range(5))
def test_merge_equals_brute_force_with_ties_and_padding(seed):
    rng = np.random.default_rng(seed)
    q, shards, k = 7, 4, 6
    pool = np.round(rng.uniform(-1, 1, 12), 1)  # few distinct values: many exact ties across shards
    results, all_s, all_i = [], [], []
    for s in range(shards):
        n = rng.integers(0, k + 1)  # some shards hold fewer than k items: padding
        sims = rng.choice(pool, (q, n)).astype(np.float32)
        ids = np.array([[f"id-{rng.integers(1000):04d}-{s}" for _ in range(n)] for _ in range(q)], dtype=object)
        sims = np.concatenate([sims, np.full((q, k - n), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids.reshape(q, n), np.full((q, k - n), "", dtype=object)], 1)
        order = order_best_first(sims, ids)  # each shard's list is best first, as shards return them
        sims, ids = np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)
        labels = np.vectorize(lambda i: len(i))(ids)
        results.append((sims, ids, labels))
        all_s.append(sims)
        all_i.append(ids)
    sims, ids, labels = merge_topk(results, k)
    want = _oracle(np.concatenate(all_s, 1), np.concatenate(all_i, 1), k)
    real = np.isfinite(sims)
    np.testing.assert_array_equal(np.where(real, ids, ""), np.where(real, want, ""))
    assert (np.diff(sims, axis=1) <= 0).all()  # best first
    np.testing.assert_array_equal(labels, np.vectorize(lambda i: len(i))(ids))  # payload travels with its column


def test_merge_width_and_errors():
    a = (np.array([[0.9, 0.5]], np.float32), np.array([["b", "c"]], dtype=object))
    b = (np.array([[0.9]], np.float32), np.array([["a"]], dtype=object))
    sims, ids = merge_topk([a, b], 10)
    assert ids.tolist() == [["a", "b", "c"]] and sims.shape == (1, 3)
    assert merge_topk([a, b], 1)[1].tolist() == [["a"]]
    with pytest.raises(ValueError, match="at least one shard"):
        merge_topk([], 3)


def test_order_best_first_breaks_ties_by_key_and_puts_padding_last():
    sims = np.array([[0.2, -np.inf, 0.7, 0.7, 0.2]], np.float32)
    keys = np.array([[5, 0, 9, 1, 3]])
    assert order_best_first(sims, keys).tolist() == [[3, 2, 4, 0, 1]]


@pytest.mark.parametrize("seed", range(5))
def test_merge_keys_on_numbers_equals_brute_force(seed):
    # The memory's merge: integer keys, ids looked up only for tied rows; same rule as merge_topk.
    rng = np.random.default_rng(seed)
    q, shards, k = 9, 5, 4
    names = np.array([f"id-{i:03d}" for i in rng.permutation(200)], dtype=object)  # key -> id, not sorted
    pool = np.round(rng.uniform(-1, 1, 8), 1)  # few distinct values: many ties, also across the cut
    results = []
    for s in range(shards):
        n = rng.integers(0, k + 1)
        sims = np.concatenate([rng.choice(pool, (q, n)), np.full((q, k - n), -np.inf)], 1).astype(np.float32)
        keys = np.concatenate([rng.integers(s * 40, s * 40 + 40, (q, n)), np.full((q, k - n), -1)], 1)
        order = order_best_first(sims, np.where(keys >= 0, names[keys], ""))
        results.append((np.take_along_axis(sims, order, 1), np.take_along_axis(keys, order, 1)))

    def ids_of(keys):
        return np.where(keys >= 0, names[np.maximum(keys, 0)], "")

    sims, keys = merge_keys(results, k, ids_of)
    all_s = np.concatenate([r[0] for r in results], 1)
    all_i = ids_of(np.concatenate([r[1] for r in results], 1))
    want = _oracle(all_s, all_i, k)
    real = np.isfinite(sims)
    np.testing.assert_array_equal(np.where(real, names[np.maximum(keys, 0)], ""), np.where(real, want, ""))
    assert (sims[:, 1:] <= sims[:, :-1]).all()  # best first, padding (-inf) last


def test_merge_keys_looks_up_no_id_without_ties():
    sims = [np.array([[0.9, 0.4], [0.8, 0.1]], np.float32), np.array([[0.7, 0.5], [0.6, 0.2]], np.float32)]
    keys = [np.array([[1, 2], [3, 4]]), np.array([[11, 12], [13, 14]])]

    def no_ids(keys):
        raise AssertionError("ids looked up without a tie")

    s, got = merge_keys(list(zip(sims, keys)), 3, no_ids)
    assert got.tolist() == [[1, 11, 12], [3, 13, 14]]
    np.testing.assert_allclose(s, [[0.9, 0.7, 0.5], [0.8, 0.6, 0.2]])


def test_order_best_first_keeps_sorted_rows_and_still_breaks_their_ties():
    sims = np.array([[0.9, 0.5, 0.5, 0.1], [0.8, 0.7, 0.6, -np.inf]], np.float32)  # already best first
    keys = np.array([[1, 7, 3, 2], [4, 5, 6, 0]])
    assert order_best_first(sims, keys).tolist() == [[0, 2, 1, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("seed", range(4))
def test_merge_with_refetch_equals_merging_full_lists(seed):
    # Shards answer a short cut first; the merge asks again only where a shard may hold more.
    rng = np.random.default_rng(seed)
    q, shards, k = 50, 6, 12
    names = np.array([f"id-{i:04d}" for i in rng.permutation(shards * 100)], dtype=object)
    sims_of = np.round(rng.uniform(-1, 1, (q, shards * 100)), 2).astype(np.float32)  # ties, also at the cut
    sims_of[:5, :100] += 1  # five queries whose best items all sit in shard 0: its cut is too short
    full = []
    for s in range(shards):
        keys = np.broadcast_to(np.arange(s * 100, s * 100 + 100), (q, 100))
        block = sims_of[:, s * 100:(s + 1) * 100]
        order = order_best_first(block, names[keys])[:, :k]
        full.append((np.take_along_axis(block, order, 1), np.take_along_axis(keys, order, 1)))
    ids_of = lambda keys: np.where(keys >= 0, names[np.maximum(keys, 0)], "")  # noqa: E731
    calls = []

    def refetch(i, rows):
        calls.append((i, len(rows)))
        return full[i][0][rows], full[i][1][rows]

    cut = first_cut(k, shards)
    assert cut < k
    got = merge_with_refetch([(s[:, :cut], kk[:, :cut]) for s, kk in full], k, refetch, ids_of)
    want = merge_keys(full, k, ids_of)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert calls and all(n >= 5 for _, n in calls)  # the five queries (at least) asked again
    assert sum(n for _, n in calls) < q * shards / 2  # most queries were not
