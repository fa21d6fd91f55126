"""On-disk memories: round trips (local and a real GCS emulator), and every bad input and bad memory."""
import json
import os

import numpy as np
import pytest

from conftest import clustered
from memory import Memory, MemoryFormatError, write_memory
from memory import manifest as mf

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def data():
    x, labels = clustered(600, 16, 4, seed=11)
    ids = np.array([f"item-{i:04d}" for i in range(600)], dtype=object)
    q, _ = clustered(20, 16, 4, seed=12)
    return x, labels, ids, q


def _roundtrip(path, data, backend):
    x, labels, ids, q = data
    prov = {"source": np.array(["fmnist"] * 600, dtype=object),
            "label_source": np.array(["human"] * 300 + ["teacher"] * 300, dtype=object)}
    weights = np.linspace(0.5, 1.0, 600)
    manifest = write_memory(path, x, labels, ids, num_shards=3, backend=backend, class_names=CLASSES,
                            weights=weights, provenance=prov, encoder={"name": "test-encoder"})
    with Memory.open(path) as mem:
        assert mem.version == 1 and len(mem) == 600 and mem.class_names == CLASSES
        assert mem.manifest.encoder["name"] == "test-encoder"
        nb = mem.search(q, 5)
        res = mem.classify(q, 5, "plurality")
    # Each neighbour carries its own label and weight back from storage.
    lookup_w = dict(zip(ids, weights.astype(np.float32)))
    lookup_l = dict(zip(ids, labels))
    np.testing.assert_allclose(nb.weights, np.vectorize(lookup_w.get)(nb.ids))
    np.testing.assert_array_equal(nb.labels, np.vectorize(lookup_l.get)(nb.ids))
    np.testing.assert_allclose(res.scores.sum(1), nb.weights.sum(1), rtol=1e-6)
    return manifest, nb


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_local_roundtrip_and_relocation(tmp_path, data, backend):
    manifest, nb = _roundtrip(str(tmp_path / "m"), data, backend)
    assert manifest.count == 600 and len(manifest.shards) == 3
    # A memory is relocatable: every path in it is relative (ScaNN serialised with relative paths).
    os.rename(tmp_path / "m", tmp_path / "moved")
    with Memory.open(str(tmp_path / "moved")) as mem:
        np.testing.assert_array_equal(mem.search(data[3], 5).ids, nb.ids)


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_gcs_roundtrip_equals_local(tmp_path, gcs_path, data, backend):
    _, nb_gcs = _roundtrip(gcs_path, data, backend)
    _, nb_local = _roundtrip(str(tmp_path / "m"), data, backend)
    np.testing.assert_array_equal(nb_gcs.ids, nb_local.ids)
    np.testing.assert_allclose(nb_gcs.sims, nb_local.sims)
    assert mf.list_versions(gcs_path) == [1]


def test_gcs_corrupt_shard_is_refused(gcs_path, data):
    import fsspec

    x, labels, ids, _ = data
    write_memory(gcs_path, x, labels, ids, num_shards=2, class_names=CLASSES)
    entry = mf.read_manifest(gcs_path).shards[0]
    fs, root = fsspec.core.url_to_fs(f"{gcs_path}/{entry.path}/items.parquet")
    blob = bytearray(fs.cat_file(root))
    blob[len(blob) // 2] ^= 0xFF
    fs.pipe_file(root, bytes(blob))
    with pytest.raises(MemoryFormatError, match="corrupt: items.parquet does not match its checksum"):
        Memory.open(gcs_path)


def test_missing_memory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no memory at"):
        Memory.open(str(tmp_path / "nothing"))


def test_partial_memory_without_manifest(tmp_path, data):
    x, labels, ids, _ = data
    write_memory(str(tmp_path / "m"), x, labels, ids, num_shards=2, class_names=CLASSES)
    os.remove(mf.manifest_path(str(tmp_path / "m"), 1))  # as if the write died before publishing
    with pytest.raises(FileNotFoundError, match="holds no published memory"):
        Memory.open(str(tmp_path / "m"))


def test_missing_and_corrupt_shard_files(tmp_path, data):
    x, labels, ids, _ = data
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, num_shards=2, class_names=CLASSES)
    shard_dir = os.path.join(root, mf.read_manifest(root).shards[1].path)
    emb = os.path.join(shard_dir, "embeddings.npy")
    data_bytes = bytearray(open(emb, "rb").read())
    data_bytes[-3] ^= 0x01
    open(emb, "wb").write(bytes(data_bytes))
    with pytest.raises(MemoryFormatError, match="shard-00001-of-00002 .* corrupt: embeddings.npy"):
        Memory.open(root)
    # Without checksum verification the size check still catches a truncated file.
    open(emb, "wb").write(bytes(data_bytes[:-10]))
    with pytest.raises(MemoryFormatError, match="corrupt"):
        Memory.open(root, verify=False)
    os.remove(emb)
    with pytest.raises(MemoryFormatError, match="incomplete: embeddings.npy is missing"):
        Memory.open(root)


def test_corrupt_manifest_and_unknown_format_version(tmp_path, data):
    x, labels, ids, _ = data
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, num_shards=1, class_names=CLASSES)
    path = mf.manifest_path(root, 1)
    good = json.load(open(path))
    json.dump({**good, "format_version": 99}, open(path, "w"))
    with pytest.raises(MemoryFormatError, match="format version 99; this vismem reads versions 1, 2"):
        Memory.open(root)
    open(path, "w").write('{"format": "vismem-memory", "shards": [')
    with pytest.raises(MemoryFormatError, match="is corrupt"):
        Memory.open(root)
    with pytest.raises(FileNotFoundError, match="has no version 7"):
        Memory.open(root, version=7)


def test_pinned_version_and_no_overwrite(tmp_path, data):
    x, labels, ids, _ = data
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, num_shards=1, class_names=CLASSES)
    with pytest.raises(ValueError, match="a memory already exists"):
        write_memory(root, x, labels, ids, num_shards=1, class_names=CLASSES)
    with Memory.open(root, version=1) as mem:
        assert mem.version == 1


def test_bad_items_are_refused_before_anything_is_written(tmp_path, data):
    x, labels, ids, _ = data
    root = str(tmp_path / "m")
    nan = np.where(np.arange(600)[:, None] == 3, np.nan, x)
    zero = np.where(np.arange(600)[:, None] == 3, 0.0, x)
    cases = [
        (dict(embeddings=x, labels=labels, ids=np.array(["dup"] * 600, dtype=object)),
         r"600 of 600 items .* row 0 \(id 'dup'\): duplicate id"),
        (dict(embeddings=x, labels=labels + 4, ids=ids), r"600 of 600 .* row 0 .*: label \d outside the 4 class names"),
        (dict(embeddings=x[:10], labels=labels, ids=ids), "one row per item"),
        (dict(embeddings=nan, labels=labels, ids=ids), r"1 of 600 .* row 3 \(id 'item-0003'\): NaN or infinite"),
        (dict(embeddings=zero, labels=labels, ids=ids), r"1 of 600 .* row 3 .*: all-zero embedding"),
        (dict(embeddings=x[:0], labels=labels[:0], ids=ids[:0]), "empty memory"),
        (dict(embeddings=x, labels=labels.astype(float), ids=ids), "labels must be integers"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            write_memory(root, kwargs["embeddings"], kwargs["labels"], kwargs["ids"], class_names=CLASSES)
        assert not os.path.exists(root)
    with pytest.raises(ValueError, match=r"row 5 \(id 'item-0005'\): label_source 'crowd' is not one of human"):
        write_memory(root, x, labels, ids, class_names=CLASSES,
                     provenance={"label_source": np.where(np.arange(600) == 5, "crowd", "human")})
    with pytest.raises(ValueError, match="weights must be one finite"):
        write_memory(root, x, labels, ids, class_names=CLASSES, weights=-np.ones(600))
    assert not os.path.exists(root)
    with pytest.raises(ValueError, match="unknown index backend 'faiss'"):
        write_memory(root, x, labels, ids, class_names=CLASSES, backend="faiss")


def test_bad_queries_name_the_problem(tmp_path, data):
    x, labels, ids, q = data
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, num_shards=2, class_names=CLASSES)
    with Memory.open(root) as mem:
        with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
            mem.search(q[:, :8], 5)
        with pytest.raises(ValueError, match="NaN or infinite"):
            mem.search(np.where(np.arange(20)[:, None] == 2, np.inf, q), 5)
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            mem.search(q, 0)
        with pytest.raises(ValueError, match="unknown voting method"):
            mem.classify(q, 5, "majority")
        # A single query vector is accepted as a batch of one.
        assert mem.search(q[0], 3).ids.shape == (1, 3)


def test_empty_memory_is_refused_at_query_time(tmp_path):
    root = str(tmp_path / "empty")
    mf.write_manifest(root, mf.Manifest.new(version=1, dim=4, class_names=["a"], backend="exact", shards=[]))
    with Memory.open(root) as mem:
        with pytest.raises(ValueError, match="is empty: nothing to search"):
            mem.search(np.ones((1, 4)), 1)
