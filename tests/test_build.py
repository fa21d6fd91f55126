"""The Beam build (multi-process DirectRunner) against the single-process writer and the oracle."""
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import clustered, oracle_topk
from memory import Memory, schema, write_memory
from memory import manifest as mf
from memory.partition import Router, hash_partition, nearest_partitions
from pipelines.build import add_to_memory, build_memory

# Every DoFn is pickled into worker processes, as on a real distributed runner.
PIPE = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
CLASSES = [f"c{i}" for i in range(6)]
ENCODER = {"encoder": "test-encoder", "encoder_version": "7"}
VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")


def _write(path, ids, x, labels, source="set-a"):
    n = len(ids)
    prov = {"source": np.full(n, source, dtype=object), "uri": np.array([f"file://{i}.png" for i in ids], dtype=object)}
    schema.write_embeddings(str(path), schema.embedding_table(ids, x, labels, provenance=prov, metadata=ENCODER))


def _good_inputs(folder, n=1800, dim=16, seed=5, files=3):
    x, labels = clustered(n, dim, len(CLASSES), seed)
    ids = np.array([f"img-{(i * 7919) % n:05d}" for i in range(n)], dtype=object)
    paths = []
    for f in range(files):
        rows = slice(f * n // files, (f + 1) * n // files)
        paths.append(folder / f"part-{f:03d}.parquet")
        _write(paths[-1], ids[rows], x[rows], labels[rows], source=f"set-{f}")
    return paths


def _vectors(shard, ids, x):
    """The input rows of a shard's items, in its order (the exact index keeps no copy of its own)."""
    row = {i: r for r, i in enumerate(ids)}
    return x[[row[i] for i in shard.ids]]


def _read_all(paths):
    parts = [schema.read_embeddings(str(p)) for p in paths]
    return {
        "ids": np.concatenate([p["ids"] for p in parts]),
        "embeddings": np.concatenate([p["embeddings"] for p in parts]),
        "labels": np.concatenate([p["labels"] for p in parts]),
        "provenance": {c: np.concatenate([p["provenance"][c] for p in parts]) for c in schema.PROVENANCE_COLUMNS},
    }


def test_beam_build_equals_write_memory_and_dead_letters_bad_rows(tmp_path):
    inputs = tmp_path / "emb"
    inputs.mkdir()
    good_paths = _good_inputs(inputs)
    # One file of rows that each break one rule, one of the wrong dimension, one that is not Parquet.
    unit = np.eye(16, dtype=np.float32)
    dup = str(schema.read_embeddings(str(good_paths[0]))["ids"][3])
    bad = {
        "bad-nan": (np.where(np.arange(16) == 0, np.nan, unit[1]), 0),
        "bad-zero": (np.zeros(16), 0),
        "bad-norm": (2 * unit[2], 1),
        "bad-label": (unit[3], 6),
        "bad-unlabelled": (unit[4], -1),
        dup: (unit[5], 2),  # repeats an id of part-000: both copies are rejected
        "": (unit[6], 2),
        "good-extra": (unit[7], 3),
    }
    bad_path = inputs / "part-bad.parquet"
    _write(bad_path, list(bad), np.stack([v[0] for v in bad.values()]).astype(np.float32), [v[1] for v in bad.values()])
    _write(inputs / "part-dim8.parquet", ["w0", "w1", "w2"], np.eye(3, 8, dtype=np.float32), [0, 1, 2])
    (inputs / "part-junk.parquet").write_bytes(b"this is not parquet")

    out = str(tmp_path / "beam")
    # Refused at the door by default (pipelines.validate.BadInputs); let through, they reach the dead letter.
    summary = build_memory(str(inputs), out, num_shards=4, class_names=CLASSES, backend="exact", pipeline_args=PIPE,
                           skip_bad_files=True)

    dead = pq.read_table(summary["dead_letter"]["path"]).to_pylist()
    got = sorted((r["id"], r["reason"].split(" ")[0]) for r in dead)
    assert got == sorted([
        ("", "empty"), ("", "unreadable"), ("bad-label", "label"), ("bad-nan", "NaN"), ("bad-norm", "norm"),
        ("bad-unlabelled", "no"), ("bad-zero", "all-zero"), (dup, "duplicate"), (dup, "duplicate"),
        ("w0", "dimension"), ("w1", "dimension"), ("w2", "dimension"),
    ])
    assert summary["dead_letter"]["count"] == 12
    assert {r["file"] for r in dead if r["id"] == dup} == {str(good_paths[0]), str(bad_path)}
    assert next(r for r in dead if r["id"] == "bad-label")["reason"] == "label 6 outside the 6 class names"

    # The single-process writer on the rows that passed gives the very same shards, byte for byte.
    rows = _read_all(good_paths + [bad_path])
    keep = np.isin(rows["ids"].astype(str), [k for k in bad if k != "good-extra"], invert=True)
    ref = str(tmp_path / "ref")
    write_memory(ref, rows["embeddings"][keep], rows["labels"][keep], rows["ids"][keep], num_shards=4,
                 backend="exact", class_names=CLASSES, provenance={c: v[keep] for c, v in rows["provenance"].items()})
    beam_m, ref_m = mf.read_manifest(out), mf.read_manifest(ref)
    assert [s.name for s in beam_m.shards] == [s.name for s in ref_m.shards]
    for b, r in zip(beam_m.shards, ref_m.shards):
        assert b.count == r.count and b.files == r.files, b.name
    assert beam_m.count == keep.sum() == summary["items_added"] == 1800 - 1 + 1
    assert beam_m.encoder == {"name": "test-encoder", "version": "7"}
    assert summary["bytes_per_item"] > 16 * 4 and len(summary["shards"]) == 4
    assert summary["counters"].get("rows_read") == 1800 + 8 + 3

    # Hash assignment is the stable id hash: each shard holds exactly the ids hash_partition gives it.
    q, _ = clustered(40, 16, len(CLASSES), seed=99)
    with Memory.open(out) as a, Memory.open(ref) as b:
        for j, shard in enumerate(a.shards):
            assert (hash_partition(shard.ids, 4) == j).all()
        na, nb = a.search(q, 15), b.search(q, 15)
    np.testing.assert_array_equal(na.ids, nb.ids)
    np.testing.assert_array_equal(na.sims, nb.sims)
    want_ids, _ = oracle_topk(q, rows["embeddings"][keep], rows["ids"][keep], 15)
    np.testing.assert_array_equal(na.ids, want_ids)


def test_beam_build_on_gcs_with_scann_equals_write_memory(tmp_path, gcs_path):
    local = tmp_path / "emb"
    local.mkdir()
    paths = _good_inputs(local, n=1500, dim=12, seed=8, files=2)
    remote = []
    for p in paths:
        remote.append(f"{gcs_path}/emb/{p.name}")
        schema.write_embeddings(remote[-1], pq.read_table(p))
    # Tree + AH shards (forced at this size), every leaf searched and a deep exact reorder, so both
    # memories return the exact top-10 although AH training is not bit-for-bit repeatable.
    params = {"brute_force": False, "num_leaves": 4, "num_leaves_to_search": 4, "training_sample_size": 500,
              "reorder": 300}
    out = f"{gcs_path}/memory"
    summary = build_memory(f"{gcs_path}/emb/*.parquet", out, num_shards=3, class_names=CLASSES, backend="scann",
                           backend_params=params, pipeline_args=PIPE)
    assert summary["dead_letter"]["count"] == 0 and summary["items_added"] == 1500
    rows = _read_all(paths)
    ref = str(tmp_path / "ref")
    write_memory(ref, rows["embeddings"], rows["labels"], rows["ids"], num_shards=3, backend="scann",
                 class_names=CLASSES, provenance=rows["provenance"], backend_params=params)
    beam_m, ref_m = mf.read_manifest(out), mf.read_manifest(ref)
    for b, r in zip(beam_m.shards, ref_m.shards):
        assert b.name == r.name and b.params == r.params and not b.params["brute_force"]
        assert "scann/hashed_dataset.npy" in b.files
        for f in ("items.parquet", "embeddings.npy"):
            assert b.files[f] == r.files[f]
    q, _ = clustered(30, 12, len(CLASSES), seed=31)
    with Memory.open(out) as a, Memory.open(ref) as b:
        na, nb = a.search(q, 10), b.search(q, 10)
    np.testing.assert_array_equal(na.ids, nb.ids)
    np.testing.assert_allclose(na.sims, nb.sims, atol=1e-6)


@pytest.mark.parametrize("cells", [8, None])
def test_kmeans_build_routes_queries_to_nearest_shards(tmp_path, cells):
    """One centroid per shard (cells=8), and the default of several k-means cells per shard."""
    inputs = tmp_path / "emb"
    inputs.mkdir()
    n, dim = 4000, 32
    x, labels = clustered(n + 300, dim, 40, seed=17)
    x, labels, q = x[:n], labels[:n], x[n:]  # queries: held-out points of the same clusters
    ids = np.array([f"k-{i:05d}" for i in range(n)], dtype=object)
    for f in range(2):
        _write(inputs / f"part-{f}.parquet", ids[f::2], x[f::2], labels[f::2] % len(CLASSES))
    out = str(tmp_path / "m")
    build_memory(str(inputs), out, num_shards=8, class_names=CLASSES, partition="kmeans", backend="exact",
                 kmeans_cells=cells, pipeline_args=PIPE)
    want, _ = oracle_topk(q, x, ids, 10)
    recall = {}
    with Memory.open(out) as mem:
        part = mem.manifest.partitioning
        centroids = np.asarray(part.centroids, np.float32)
        cell_part = np.asarray(part.cell_partitions)
        expect_cells = 8 if cells else 80  # default: 16 per shard, at most one per 50 sampled rows
        assert centroids.shape == (expect_cells, dim) and part.method == "kmeans"
        assert sorted(set(cell_part)) == list(range(8))
        for shard in mem.shards:  # every item sits in the shard of its nearest cell
            assert (cell_part[(_vectors(shard, ids, x) @ centroids.T).argmax(1)] == shard.entry.partition).all()
        for p in (1, 2, 4, 8):
            got = mem.search(q, 10, probe_shards=p).ids
            recall[p] = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
        np.testing.assert_array_equal(mem.search(q, 10, probe_shards=8).ids, want)
        # Routed search equals an exact search over the visited shards' items (the exact backend).
        route = nearest_partitions(q, centroids, 2, cell_part)
        got = mem.search(q, 10, probe_shards=2)
        item_part = cell_part[(x @ centroids.T).argmax(1)]
        for i in range(0, len(q), 37):
            allowed = np.isin(item_part, route[i])
            w, _ = oracle_topk(q[i:i + 1], x[allowed], ids[allowed], 10)
            np.testing.assert_array_equal(got.ids[i], w[0])
        # With a probe margin, equal to an exact search over the partitions within the margin, and
        # between one probe and four in what it visits.
        router = Router(centroids, cell_part)
        near = np.sort(q @ centroids.T, axis=1)  # (one cell per partition when cells=8; enough either way)
        margin = float(np.median(near[:, -1] - near[:, -2]))  # about half the queries visit a second one
        route = router(q, 4, margin)
        assert ((route >= 0).sum(1) >= 1).all() and (route[:, 0] >= 0).all()
        assert 1 < (route >= 0).sum(1).mean() < 4, (route >= 0).sum(1).mean()
        got = mem.search(q, 10, probe_shards=4, probe_margin=margin)
        for i in range(0, len(q), 23):
            allowed = np.isin(item_part, route[i][route[i] >= 0])
            w, _ = oracle_topk(q[i:i + 1], x[allowed], ids[allowed], 10)
            np.testing.assert_array_equal(got.ids[i], w[0])
    # Tight clusters (noise 0.3 around 40 centres) fall almost whole into one k-means cell, so one
    # probed shard already finds most neighbours; recall can only grow with more probes.
    assert recall[8] == 1.0
    assert recall[1] >= 0.9 and recall[2] >= 0.97, recall
    assert recall[1] <= recall[2] <= recall[4] <= recall[8]
    if cells is None:  # an add routes new items by the memory's cells, into new shards of their partitions
        extra = tmp_path / "extra"
        extra.mkdir()
        new_ids = np.array([f"new-{i:03d}" for i in range(len(q))], dtype=object)
        _write(extra / "part-0.parquet", new_ids, q, np.zeros(len(q), int))
        add_to_memory(out, str(extra), pipeline_args=PIPE)
        with Memory.open(out) as mem:
            assert mem.manifest.partitioning == part
            added = [s for s in mem.shards if "-add-" in s.entry.name]
            assert sum(len(s.ids) for s in added) == len(q)
            for shard in added:
                assert (cell_part[(_vectors(shard, new_ids, q) @ centroids.T).argmax(1)] == shard.entry.partition).all()
            got = mem.search(q, 1, probe_shards=1).ids[:, 0]
            np.testing.assert_array_equal(got, new_ids)  # each new item is its own nearest, in its routed shard


def test_build_help_teaches_and_bad_arguments_fail_at_the_door(tmp_path):
    res = subprocess.run([VISMEM, "build", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "example: vismem build" in res.stdout and "DataflowRunner" in res.stdout and "FlinkRunner" in res.stdout
    res = subprocess.run([VISMEM, "build", str(tmp_path / "nothing*.parquet"), str(tmp_path / "m"),
                          "--num-shards", "2", "--class-names", "a,b"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no embedding shards match" in res.stderr and "Traceback" not in res.stderr
    with pytest.raises(ValueError, match="unknown partitioning 'random'"):
        build_memory(str(tmp_path), str(tmp_path / "m"), num_shards=2, class_names=["a"], partition="random")
    with pytest.raises(ValueError, match="class names repeat"):
        build_memory(str(tmp_path), str(tmp_path / "m"), num_shards=2, class_names=["a", "a"])


def test_add_refuses_embeddings_of_another_encoder_naming_both(tmp_path):
    x, labels = clustered(40, 8, 2, seed=3)
    ids = np.array([f"e-{i:02d}" for i in range(40)], dtype=object)
    root = str(tmp_path / "m")
    write_memory(root, x[:20], labels[:20], ids[:20], class_names=["a", "b"],
                 encoder={"name": "test-encoder", "version": "7"})
    _write(tmp_path / "new.parquet", ids[20:], x[20:], labels[20:])  # also test-encoder, version 7
    other = {"encoder": "test-encoder", "encoder_version": "8", "preprocessing": "rgb x / 255"}
    schema.write_embeddings(str(tmp_path / "other.parquet"), schema.embedding_table(ids[20:], x[20:], labels[20:],
                                                                                    metadata=other))
    with pytest.raises(ValueError, match=r"the embedding shards come from different encoders: encoders differ in "
                                         r"version: test-encoder \(version=8, preprocessing=rgb x / 255\) vs "
                                         r"test-encoder \(version=7\)"):
        add_to_memory(root, [str(tmp_path / "new.parquet"), str(tmp_path / "other.parquet")])
    with pytest.raises(ValueError, match=r"cannot add to .*: encoders differ in version: test-encoder "
                                         r"\(version=7\) vs test-encoder \(version=8, preprocessing=rgb x / 255\)"):
        add_to_memory(root, str(tmp_path / "other.parquet"))
