"""memory.items: the item policy (reasons row by row, and the strict door) and the items-table reader."""
import numpy as np
import pytest

from conftest import clustered
from memory import items, write_memory
from memory import manifest as mf
from memory.items import ItemPolicy


def _batch():
    x, _ = clustered(10, 4, 2, seed=5)
    ids = np.array([f"i{j}" for j in range(10)], dtype=object)
    labels = np.array([0, 1] * 5)
    return ids, x, labels


def test_every_reason_with_the_build_strings():
    ids, x, labels = _batch()
    ids[0] = ""
    x[1, 2] = np.nan
    x[2] = 0.0
    x[3] *= 1.5
    labels[4] = -1
    labels[5] = 7
    sources = np.array(["human"] * 6 + ["crowd", "teacher", "human", "human"], dtype=object)
    ids[9] = ids[8]
    ids[7] = "gone"
    reasons = ItemPolicy(4, 2).reasons(ids, x, labels, label_sources=sources, forgotten={"gone"})
    assert reasons.tolist() == [
        "empty id",
        "NaN or infinite values in the embedding",
        "all-zero embedding (no direction)",
        "norm 1.5 is not 1 within 0.01: the embedding is not L2-normalised",
        "no label (-1): a memory item needs a class",
        "label 7 outside the 2 class names",
        "label_source 'crowd' is not one of human, teacher",
        "id was removed from this memory (unlearning); add it back only with --readmit",
        "duplicate id: 2 input rows share it (all are rejected)",
        "duplicate id: 2 input rows share it (all are rejected)",
    ]


def test_first_reason_wins_and_good_rows_pass():
    ids, x, labels = _batch()
    x[0] = np.nan
    labels[0] = 9  # also out of range, but NaN comes first
    ids[1] = ids[0]  # a duplicate only of a rejected row: the good one is not a duplicate
    reasons = ItemPolicy(4, 2).reasons(ids, x, labels)
    assert reasons[0] == "NaN or infinite values in the embedding"
    assert reasons[1:].tolist() == [None] * 9
    assert ItemPolicy(4, 2).reasons(ids, x, labels, unique=False)[1] is None


def test_dimension_and_tolerance():
    ids, x, labels = _batch()
    assert set(ItemPolicy(5, 2).reasons(ids, x, labels)) == {"dimension 4 differs from the memory's 5"}
    ids[0] = ""
    assert ItemPolicy(5, 2).reasons(ids, x, labels)[0] == "empty id"  # the earlier reason stays
    far = x * 3
    assert ItemPolicy(4, 2, norm_tolerance=None).reasons(ids[1:], far[1:], labels[1:]).tolist() == [None] * 9
    assert ItemPolicy(4, 2, norm_tolerance=2.5).reasons(ids[1:], far[1:], labels[1:]).tolist() == [None] * 9
    with pytest.raises(ValueError, match="one row per item"):
        ItemPolicy(4, 2).reasons(ids, x[:3], labels)
    with pytest.raises(ValueError, match="norm tolerance"):
        ItemPolicy(4, 2, norm_tolerance=-1)


def test_strict_admit_names_the_first_bad_row_and_normalises():
    ids, x, labels = _batch()
    emb = ItemPolicy(4, 2, norm_tolerance=None).admit(ids, x * 4, labels)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(emb, x, atol=1e-6)
    x[6] = np.inf
    x[8] = np.inf
    with pytest.raises(ValueError, match=r"2 of 10 items may not enter the memory; first: row 6 \(id 'i6'\): NaN"):
        ItemPolicy(4, 2).admit(ids, x, labels)
    with pytest.raises(ValueError, match="no items given"):
        ItemPolicy(4, 2).admit(ids[:0], x[:0], labels[:0])
    with pytest.raises(ValueError, match="weights must be one finite"):
        ItemPolicy(4, 2).admit(ids[:2], x[:2], labels[:2], weights=[1.0, np.nan])


def test_normalise_and_duplicates():
    with pytest.raises(ValueError, match=r"queries contain all-zero rows.*first: 1"):
        items.normalise(np.array([[1.0, 0.0], [0.0, 0.0]]), what="queries")
    assert items.duplicate_reasons(["a", "b", "a"], existing_ids=["b", "z"]) == {
        "a": "duplicate id: 2 input rows share it (all are rejected)",
        "b": "id already in the memory (remove it first to replace it)"}


def test_read_items_in_place(tmp_path):
    ids, x, labels = _batch()
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, num_shards=2, class_names=["a", "b"],
                 provenance={"uri": np.array([f"f#{i}" for i in range(10)], dtype=object)})
    seen = []
    for entry in mf.read_manifest(root).shards:
        t = items.read_items(root, entry, columns=["id", "uri"])
        assert t.column_names == ["id", "uri"] and len(t) == entry.count
        assert t.column("id").to_pylist() == sorted(t.column("id").to_pylist())  # rows sorted by id
        seen += t.column("uri").to_pylist()
        whole = items.read_items_at(f"{root}/{entry.path}")
        assert whole.column_names == ["id", "label", "weight", "label_source", "confidence", "source", "uri"]
    assert sorted(seen) == sorted(f"f#{i}" for i in range(10))
