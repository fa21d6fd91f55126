"""Remove, add and compact through the Beam jobs: removed ids never come back, and a compacted
memory equals one built from scratch without them (exact backend)."""
import numpy as np
import pyarrow.parquet as pq

from conftest import clustered, oracle_topk
from memory import Memory, removals, schema, write_memory
from memory import manifest as mf
from memory.mutations import collect_garbage, remove_items, version_history
from pipelines.build import add_to_memory
from pipelines.compact import compact_memory

PIPE = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
CLASSES = ["a", "b", "c", "d"]
METHODS = ("plurality", "distance", "softmax", "rank")


def test_remove_add_compact_readmit(tmp_path):
    x, labels = clustered(2200, 16, 5, seed=71)
    labels = labels % 5
    ids = np.array([f"p-{(i * 211) % 2200:05d}" for i in range(2200)], dtype=object)
    root = str(tmp_path / "m")
    base = slice(0, 1800)
    write_memory(root, x[base], labels[base] % 4, ids[base], num_shards=4, class_names=CLASSES)
    q, _ = clustered(40, 16, 5, seed=72)
    with Memory.open(root) as mem:
        gone = sorted(set(mem.search(q, 6).ids.ravel()))
    remove_items(root, ids=gone, reason="unlearning request")  # version 2

    # Add 400 new items of a new class 'e', plus one forgotten id and one id the memory holds.
    new_rows = np.arange(1800, 2200)
    forgotten_row = int(np.flatnonzero(ids == gone[0])[0])
    existing_row = int(np.flatnonzero(~np.isin(ids[base].astype(str), gone))[0])
    rows = np.concatenate([new_rows, [forgotten_row, existing_row]])
    add_labels = np.where(np.arange(len(rows)) < 400, 4, labels[rows] % 4)
    new = str(tmp_path / "new.parquet")
    schema.write_embeddings(new, schema.embedding_table(ids[rows], x[rows], add_labels))
    summary = add_to_memory(root, new, class_names=CLASSES + ["e"], pipeline_args=PIPE)  # version 3
    assert summary["version"] == 3 and summary["items_added"] == 400
    dead = {r["id"]: r["reason"] for r in pq.read_table(summary["dead_letter"]["path"]).to_pylist()}
    assert dead == {gone[0]: "id was removed from this memory (unlearning); add it back only with --readmit",
                    ids[existing_row]: "id already in the memory (remove it first to replace it)"}

    live_ids = np.concatenate([np.setdiff1d(ids[base].astype(str), gone), ids[new_rows].astype(str)])
    order = {i: r for r, i in enumerate(ids.astype(str))}
    live = np.array([order[i] for i in live_ids])
    live_labels = np.where(live >= 1800, 4, labels[live] % 4)
    want, _ = oracle_topk(q, x[live], ids[live], 25)
    with Memory.open(root) as mem:
        assert mem.class_names == CLASSES + ["e"] and len(mem) == len(live)
        nb = mem.search(q, 25)
        assert not set(nb.ids.ravel()) & set(gone)
        np.testing.assert_array_equal(nb.ids, want)

    summary = compact_memory(root, pipeline_args=PIPE)  # version 4
    assert summary["changed"] and summary["items_dropped"] == len(gone) and summary["shards"] == 4
    fresh = str(tmp_path / "fresh")
    write_memory(fresh, x[live], live_labels, ids[live], num_shards=4, class_names=CLASSES + ["e"])
    compacted, ref = mf.read_manifest(root), mf.read_manifest(fresh)
    assert compacted.tombstones is None and compacted.forget.count == len(gone)
    for a, b in zip(compacted.shards, ref.shards):
        assert a.name == b.name and a.count == b.count
        assert a.files["items.parquet"] == b.files["items.parquet"]
    with Memory.open(root) as mem, Memory.open(fresh) as scratch:
        assert mem.version == 4 and len(mem) == len(live)
        for method in METHODS:
            got, exp = mem.classify(q, 25, method), scratch.classify(q, 25, method)
            np.testing.assert_array_equal(got.predictions, exp.predictions)
            np.testing.assert_array_equal(got.neighbours.ids, exp.neighbours.ids)
            np.testing.assert_allclose(got.neighbours.sims, exp.neighbours.sims, atol=1e-6)
    assert compact_memory(root, pipeline_args=PIPE)["changed"] is False  # nothing left to do

    # Re-admitting a forgotten id takes an explicit --readmit; it then leaves the forget list.
    back = str(tmp_path / "back.parquet")
    r = forgotten_row
    schema.write_embeddings(back, schema.embedding_table(ids[[r]], x[[r]], [labels[r] % 4]))
    summary = add_to_memory(root, back, readmit=True, pipeline_args=PIPE)  # version 5
    assert summary["items_added"] == 1 and summary["dead_letter"]["count"] == 0
    with Memory.open(root) as mem:
        assert mem.search(x[r], 1).ids[0, 0] == gone[0]
        forget = removals.forget_list(root, mem.manifest).column("id").to_pylist()
    assert gone[0] not in forget and len(forget) == len(gone) - 1
    assert [h["change"] for h in version_history(root)] == ["write", "remove", "add", "compact", "add"]
    report = collect_garbage(root, keep=1)
    assert report["deleted_versions"] == [1, 2, 3, 4] and report["deleted_paths"] > 0
    with Memory.open(root) as mem:
        assert len(mem) == len(live) + 1 and not set(mem.search(q, 25).ids.ravel()) & set(gone[1:])


def test_remove_add_compact_on_gcs(tmp_path, gcs_path):
    x, labels = clustered(900, 12, 3, seed=81)
    ids = np.array([f"g-{i:04d}" for i in range(900)], dtype=object)
    write_memory(gcs_path, x[:700], labels[:700], ids[:700], num_shards=2, class_names=["a", "b", "c"])
    q, _ = clustered(20, 12, 3, seed=82)
    with Memory.open(gcs_path) as mem:
        gone = sorted(set(mem.search(q, 3).ids.ravel()))
    remove_items(gcs_path, ids=gone)
    new = f"{gcs_path}-new/new.parquet"
    schema.write_embeddings(new, schema.embedding_table(ids[700:], x[700:], labels[700:]))
    assert add_to_memory(gcs_path, new, pipeline_args=["--runner=DirectRunner"])["items_added"] == 200
    summary = compact_memory(gcs_path, pipeline_args=["--runner=DirectRunner"])
    assert summary["changed"] and summary["items_dropped"] == len(gone)
    live = np.flatnonzero(~np.isin(ids.astype(str), gone))
    want, _ = oracle_topk(q, x[live], ids[live], 10)
    with Memory.open(gcs_path) as mem:
        assert mem.version == 4 and len(mem) == len(live)
        np.testing.assert_array_equal(mem.search(q, 10).ids, want)
