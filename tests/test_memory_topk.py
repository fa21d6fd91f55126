"""memory.topk: the merge of per-shard lists equals a brute-force sort, equal similarities ordered by id."""
import numpy as np
import pytest

from memory.topk import merge_topk, order_best_first


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
