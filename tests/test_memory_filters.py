"""Search filters on provenance, applied inside each shard: k allowed neighbours against a brute-force
oracle over the allowed items, on exact shards (equal), ScaNN trees (recall), routed and removed items."""
import numpy as np
import pytest

from conftest import clustered, oracle_topk
from memory import Memory, write_memory
from memory.filters import ItemFilter
from memory.mutations import remove_items
from memory.voting import vote_and_predict

CLASSES = [f"c{i}" for i in range(10)]


def _data(n, dim, seed):
    x, labels = clustered(n, dim, 10, seed=seed)
    rng = np.random.default_rng(seed)
    ids = np.array([f"f-{i:06d}" for i in range(n)], dtype=object)
    # Pseudo-labels are the many (90%) and sources uneven, so a filter keeps few items in some shards.
    prov = {"label_source": np.where(rng.random(n) < 0.1, "human", "teacher").astype(object),
            "source": rng.choice(np.array(["web", "lab", "museum"], dtype=object), n, p=[0.7, 0.25, 0.05])}
    q, _ = clustered(80, dim, 10, seed=seed + 1)
    return x, labels % 10, ids, prov, q


@pytest.fixture(scope="module")
def small():
    return _data(3000, 16, 3)


FILTERS = [
    ItemFilter.of(include={"label_source": "human"}),
    ItemFilter.of(exclude={"source": ["web"]}),
    ItemFilter.of(include={"source": ["museum", "lab"]}, exclude={"label_source": "teacher"}),
    ItemFilter.parse(include=["source=museum"]),
]


def _allowed(where, prov):
    return where.allowed({f: prov[f] for f in ("label_source", "source")})


@pytest.mark.parametrize("num_shards", [1, 3])
def test_exact_filtered_search_equals_brute_force_over_the_allowed_items(tmp_path, small, num_shards):
    x, labels, ids, prov, q = small
    path = str(tmp_path / "m")
    write_memory(path, x, labels, ids, num_shards=num_shards, class_names=CLASSES, provenance=prov)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    with Memory.open(path) as mem:
        for where in FILTERS:
            keep = _allowed(where, prov)
            assert 0 < keep.sum() < len(ids)
            k = 25
            want_ids, want_sims = oracle_topk(q, unit[keep], ids[keep], k)
            nb = mem.search(q, k, where=where)
            np.testing.assert_array_equal(nb.ids, want_ids, err_msg=where.describe())
            np.testing.assert_allclose(nb.sims, want_sims, atol=2e-6)
            # Classification votes with exactly those neighbours.
            res = mem.classify(q, k, "rank", where=where)
            id_label = dict(zip(ids, labels))
            want_labels = np.vectorize(id_label.get)(want_ids).astype(np.int64)
            _, want_pred = vote_and_predict(want_labels, want_sims.astype(np.float32), method="rank",
                                            num_classes=len(CLASSES))
            np.testing.assert_array_equal(res.predictions, want_pred)
        # No filter: every item may come back again (the masks are per filter, not sticky).
        assert not _allowed(FILTERS[0], prov)[np.isin(ids, mem.search(q, 5).ids.ravel())].all()


def test_a_filter_allowing_fewer_than_k_items_pads_and_removals_still_hold(tmp_path, small):
    x, labels, ids, prov, q = small
    path = str(tmp_path / "m")
    write_memory(path, x, labels, ids, num_shards=2, class_names=CLASSES, provenance=prov)
    where = ItemFilter.of(include={"source": "museum", "label_source": "human"})
    keep = _allowed(where, prov)
    few = int(keep.sum())
    assert 0 < few < 40
    gone = ids[keep][:3]
    remove_items(path, ids=list(gone))
    with Memory.open(path) as mem:
        nb = mem.search(q, 40, where=where)
    allowed_live = set(ids[keep]) - set(gone)
    assert (nb.ids[:, :len(allowed_live)] != "").all() and (nb.ids[:, len(allowed_live):] == "").all()
    assert all(set(row[row != ""]) == allowed_live for row in nb.ids)
    assert (nb.labels[:, len(allowed_live):] == -1).all()


def test_filtered_search_on_scann_trees_keeps_k_allowed_neighbours(tmp_path):
    """Shards of 6,000 items are ScaNN trees: the filter over-fetches through the tree itself."""
    x, labels, ids, prov, q = _data(12000, 32, 5)
    path = str(tmp_path / "m")
    write_memory(path, x, labels, ids, num_shards=2, backend="scann", class_names=CLASSES, provenance=prov)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    with Memory.open(path) as mem:
        assert all(not s.entry.params["brute_force"] for s in mem.shards)
        for where in (FILTERS[0], FILTERS[3]):  # 10% and 5% of the items allowed
            keep = _allowed(where, prov)
            want_ids, _ = oracle_topk(q, unit[keep], ids[keep], 10)
            nb = mem.search(q, 10, where=where)
            assert (nb.ids != "").all()  # k allowed neighbours for every query, never padding
            assert np.isin(nb.ids, ids[keep]).all()
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nb.ids, want_ids)])
            assert recall >= 0.9, (where.describe(), recall)


def test_filter_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="filter fields are: label_source, source"):
        ItemFilter.of(include={"uri": "x"})
    with pytest.raises(ValueError, match="label sources are human, teacher"):
        ItemFilter.parse(include=["label_source=robot"])
    with pytest.raises(ValueError, match="write FIELD=VALUE"):
        ItemFilter.parse(exclude=["source"])
    with pytest.raises(ValueError, match="one or more non-empty strings"):
        ItemFilter.of(exclude={"source": []})
    assert ItemFilter.parse() is None and ItemFilter.of({}, {}) is None
    both = ItemFilter.parse(include=["source=a", "source=b,c"])
    assert both == ItemFilter.of(include={"source": ["c", "b", "a"]})  # a union, order-free, hashable
    assert both.to_json() == {"include": {"source": ["a", "b", "c"]}, "exclude": {}}


def test_a_filter_that_allows_nothing_answers_padding_and_no_prediction(tmp_path, small):
    x, labels, ids, prov, q = small
    path = str(tmp_path / "m")
    write_memory(path, x, labels, ids, num_shards=2, class_names=CLASSES, provenance=prov)
    nothing = ItemFilter.of(include={"label_source": "human"}, exclude={"label_source": "human"})
    with Memory.open(path) as mem:
        res = mem.classify(q[:5], 7, "plurality", where=nothing)
    assert (res.neighbours.ids == "").all() and (res.neighbours.labels == -1).all()
    assert (res.predictions == -1).all() and (res.confidence == 0).all()
