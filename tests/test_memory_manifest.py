"""memory.manifest: the typed manifest round-trips every stored form exactly and names bad fields."""
import json
import os

import numpy as np
import pytest

from conftest import clustered
from memory import MemoryFormatError, write_memory
from memory import manifest as mf
from memory.manifest import Manifest
from memory.mutations import remove_items

CLASSES = ["a", "b", "c"]


@pytest.fixture
def root(tmp_path):
    x, labels = clustered(60, 8, 3, seed=4)
    ids = np.array([f"it-{i:03d}" for i in range(60)], dtype=object)
    path = str(tmp_path / "m")
    write_memory(path, x, labels, ids, num_shards=3, class_names=CLASSES, encoder={"name": "enc", "version": "1"})
    return path


def _stored(root, version):
    return json.load(open(mf.manifest_path(root, version)))


def test_written_and_derived_manifests_round_trip_exactly(root):
    remove_items(root, ids=["it-001", "it-002"], reason="test")
    for v in (1, 2):
        stored = _stored(root, v)
        m = mf.read_manifest(root, v)
        assert isinstance(m, Manifest) and m.to_json() == stored and Manifest.from_json(stored).to_json() == stored
    v1, v2 = mf.read_manifest(root, 1), mf.read_manifest(root, 2)
    assert v1.format_version == 1 and v1.tombstones is None and "removed_count" not in _stored(root, 1)
    assert v2.format_version == mf.REMOVALS_FORMAT_VERSION and v2.parent_version == 1 and v2.change == "remove"
    assert v2.tombstones.count == 2 and v2.removed_count == 2 and v2.live_count == 58
    assert v2.change_detail["reason"] == "test"
    assert v2.referenced_paths() == {e.path for e in v2.shards} | {v2.tombstones.path, v2.forget.path}
    assert [e.partition_number for e in v1.shards] == [0, 1, 2] and v1.num_partitions == 3


def test_a_build_manifest_with_every_extension_round_trips():
    entry = mf.ShardEntry(name="shard-00001-of-00002", path=mf.shard_dir(1, "shard-00001-of-00002", token="t",
                                                                        attempt="ab"),
                          count=3, backend="scann", params={"num_leaves": 2}, partition=1, build_seconds=0.25,
                          files={"items.parquet": {"sha256": "0" * 64, "bytes": 10}})
    assert entry.path == "shards/v00000001.t/shard-00001-of-00002.ab"
    part = mf.Partitioning("kmeans", num_shards=2, centroids=[[1.0, 0.0], [0.0, 1.0]], cell_partitions=[1, 0])
    m = Manifest.new(version=1, dim=2, class_names=["x"], backend="scann", shards=[entry], partitioning=part,
                     change="build", change_detail={"items": 3}, removed_count=0,
                     build={"backend_params": {}, "storage_dtype": "float16"})
    d = m.to_json()
    assert Manifest.from_json(d) == m
    assert d["partitioning"] == {"method": "kmeans", "num_shards": 2, "centroids": [[1.0, 0.0], [0.0, 1.0]],
                                 "cell_partitions": [1, 0]}
    assert d["shards"] == [entry.to_json()] and d["shards"][0]["path"] == entry.path
    assert m.count == 3 and m.removed_count == 0 and m.shards[0].partition_number == 1


def test_new_takes_declared_typed_fields_only():
    with pytest.raises(TypeError, match="unexpected keyword argument 'tomstones'"):
        Manifest.new(version=1, dim=2, class_names=["x"], backend="exact", shards=[], tomstones=None)
    with pytest.raises(TypeError, match="each shard must be a ShardEntry, got dict"):
        Manifest.new(version=1, dim=2, class_names=["x"], backend="exact", shards=[{"name": "s"}])
    with pytest.raises(TypeError, match="partitioning must be a Partitioning, got dict"):
        Manifest.new(version=1, dim=2, class_names=["x"], backend="exact", shards=[], partitioning={"method": "hash"})


def test_shard_dir():
    assert mf.shard_dir(1, "shard-00000-of-00004") == "shards/v00000001/shard-00000-of-00004"
    assert mf.shard_dir(12, "s", token="abc") == "shards/v00000012.abc/s"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(shards={}), r"field 'shards' must be a list, got dict"),
    (lambda d: d.update(dim="16"), r"field 'dim' must be an integer, got str"),
    (lambda d: d.update(version=True), r"field 'version' must be an integer, got bool"),
    (lambda d: d.update(class_names=["a", 2]), r"field 'class_names' must be a list of strings"),
    (lambda d: d["shards"][1].update(count=None), r"shards'\[1\]: field 'count' must be an integer"),
    (lambda d: d["shards"][0].pop("files"), r"shards'\[0\] lacks the field 'files'"),
    (lambda d: d["shards"][0]["files"]["items.parquet"].pop("sha256"), r"'items.parquet' must hold sha256"),
    (lambda d: d.update(tombstones={"path": "x"}), r"field 'tombstones' lacks the field 'count'"),
    (lambda d: d.update(partitioning={"method": "kmeans", "centroids": [[1.0]], "cell_partitions": [0, 1]}),
     r"2 cell partitions for 1 centroids"),
    (lambda d: d.update(surprise=1), r"unknown field\(s\) \['surprise'\]"),
    (lambda d: d.pop("backend"), r"lacks the field 'backend'"),
])
def test_bad_fields_are_named_on_read(root, change, message):
    d = _stored(root, 1)
    change(d)
    json.dump(d, open(mf.manifest_path(root, 1), "w"))
    with pytest.raises(MemoryFormatError, match=message):
        mf.read_manifest(root)


def test_publish_validates_and_never_overwrites(tmp_path, root):
    d = _stored(root, 1)
    before = open(mf.manifest_path(root, 1), "rb").read()
    other = dict(d, change="remove", parent_version=7)
    with pytest.raises(mf.ConcurrentUpdate, match=f"version 1 of {root} was published meanwhile by a 'write'"):
        mf.publish(root, Manifest.from_json(other))
    assert open(mf.manifest_path(root, 1), "rb").read() == before  # the winner's manifest is untouched
    with pytest.raises(TypeError, match="publish takes a Manifest, got dict"):
        mf.publish(str(tmp_path / "other"), d)
    path = mf.publish(str(tmp_path / "other"), Manifest.from_json(d))
    assert json.load(open(path)) == d
    assert mf.publish(str(tmp_path / "other"), Manifest.from_json(d)) == path  # its own bytes: a retried create
    assert os.listdir(tmp_path / "other" / "manifests") == ["v00000001.json"]  # no temporaries left
    assert mf.write_manifest is mf.publish


def test_shard_names():
    assert mf.shard_name(3, 12) == "shard-00003-of-00012"
    assert mf.parse_shard_name("shard-00003-of-00012-add-v00000004") == (3, 12)
    assert mf.parse_shard_name("part-3") is None
    entry = mf.ShardEntry("part-3", "p", 1, "exact", {}, {})
    with pytest.raises(MemoryFormatError, match="names no partition"):
        entry.partition_number
