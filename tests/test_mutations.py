"""Remove (unlearning), pinned versions, leases and gc, without Beam: the memory's versioned state."""
import json
import os
import re
import time

import numpy as np
import pytest

from conftest import clustered, oracle_topk
from memory import Memory, MemoryFormatError, write_memory
from memory import leases
from memory import manifest as mf
from memory.mutations import collect_garbage, plan_compaction, read_id_file, remove_items, version_history

CLASSES = [f"c{i}" for i in range(5)]
METHODS = ("plurality", "distance", "softmax", "rank")


@pytest.fixture(scope="module")
def data():
    x, labels = clustered(1500, 16, 5, seed=61)
    ids = np.array([f"it-{(i * 613) % 1500:04d}" for i in range(1500)], dtype=object)
    source = np.where(np.arange(1500) % 10 == 0, "web", "curated").astype(object)
    q, _ = clustered(40, 16, 5, seed=62)
    return x, labels, ids, source, q


def _write(root, data, backend="exact", rows=slice(None)):
    x, labels, ids, source, _ = data
    write_memory(root, x[rows], labels[rows], ids[rows], num_shards=3, backend=backend, class_names=CLASSES,
                 provenance={"source": source[rows]})


def test_removed_ids_are_excluded_at_once_with_k_neighbours_as_if_never_added(tmp_path, data):
    x, labels, ids, source, q = data
    root = str(tmp_path / "m")
    _write(root, data)
    with Memory.open(root) as old_reader:
        nearest = old_reader.search(q, 8).ids
        # The 8 nearest items of every query go: searches must over-fetch to still return k.
        gone = sorted(set(nearest.ravel()))
        (tmp_path / "ids.txt").write_text("\n".join(gone + ["never-existed"]) + "\n")
        summary = remove_items(root, ids=read_id_file(str(tmp_path / "ids.txt")), reason="request 7")
        assert summary["version"] == 2 and summary["removed"] == len(gone) and summary["not_found"] == 1
        # A reader pinned to version 1 is unaffected.
        np.testing.assert_array_equal(old_reader.search(q, 8).ids, nearest)

    keep = ~np.isin(ids.astype(str), gone)
    fresh = str(tmp_path / "fresh")
    write_memory(fresh, x[keep], labels[keep], ids[keep], num_shards=3, class_names=CLASSES,
                 provenance={"source": source[keep]})
    want_ids, want_sims = oracle_topk(q, x[keep], ids[keep], 30)
    for _ in range(2):  # immediately, and again after reopening
        with Memory.open(root) as mem, Memory.open(fresh) as ref:
            assert mem.version == 2 and len(mem) == keep.sum()
            nb = mem.search(q, 30)
            assert not set(nb.ids.ravel()) & set(gone)
            assert (nb.ids != "").all()
            np.testing.assert_array_equal(nb.ids, want_ids)
            np.testing.assert_allclose(nb.sims, want_sims, atol=2e-6)
            for method in METHODS:
                a, b = mem.classify(q, 30, method), ref.classify(q, 30, method)
                np.testing.assert_array_equal(a.predictions, b.predictions)
                np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    with Memory.open(root, version=1) as pinned:
        assert len(pinned) == 1500
    history = version_history(root)
    assert [h["change"] for h in history] == ["write", "remove"]
    assert history[1]["detail"]["reason"] == "request 7" and history[1]["forgotten"] == len(gone) + 1
    assert history[1]["items"] == keep.sum() and history[1]["removed_pending_compaction"] == len(gone)


def test_remove_by_label_and_by_source(tmp_path, data):
    x, labels, ids, source, q = data
    root = str(tmp_path / "m")
    _write(root, data)
    remove_items(root, label="c3")
    remove_items(root, source="web")
    live = (labels != 3) & (source != "web")
    with Memory.open(root) as mem:
        assert mem.version == 3 and len(mem) == live.sum()
        nb = mem.search(q, 50)
    assert not (nb.labels == 3).any()
    assert not set(nb.ids.ravel()) & set(ids[source == "web"])
    np.testing.assert_array_equal(nb.ids, oracle_topk(q, x[live], ids[live], 50)[0])
    with pytest.raises(ValueError, match="unknown class 'c9'; this memory's classes: c0, c1"):
        remove_items(root, label="c9")
    with pytest.raises(ValueError, match="exactly one of ids, label or source"):
        remove_items(root, ids=["it-0001"], label="c1")
    assert mf.list_versions(root) == [1, 2, 3]  # refused removals publish nothing


def test_scann_and_gcs_memories_exclude_removed_items(gcs_path, data):
    x, labels, ids, source, q = data
    _write(gcs_path, data, backend="scann")
    with Memory.open(gcs_path) as mem:
        gone = sorted(set(mem.search(q, 5).ids.ravel()))
    remove_items(gcs_path, ids=gone)
    with Memory.open(gcs_path) as mem:
        nb = mem.search(q, 20)
    assert not set(nb.ids.ravel()) & set(gone) and (nb.ids != "").all()
    keep = ~np.isin(ids.astype(str), gone)
    want, _ = oracle_topk(q, x[keep], ids[keep], 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(nb.ids, want)])
    assert recall >= 0.99  # brute-force ScaNN below 20k items per shard: exact up to float rounding


def test_removing_everything_of_a_shard_and_more_than_k(tmp_path, data):
    x, labels, ids, source, q = data
    root = str(tmp_path / "m")
    _write(root, data, rows=slice(0, 30))
    remove_items(root, ids=list(ids[:25]))
    with Memory.open(root) as mem:
        nb = mem.search(q, 10)
    assert sorted(set(nb.ids[0]) - {""}) == sorted(ids[25:30])  # only 5 live items: the rest is padding
    assert (nb.labels[:, 5:] == -1).all() and np.isneginf(nb.sims[:, 5:]).all()


def test_corrupt_removal_state_is_refused(tmp_path, data):
    root = str(tmp_path / "m")
    _write(root, data)
    remove_items(root, ids=["it-0001"])
    path = os.path.join(root, mf.read_manifest(root).tombstones.path)
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    with pytest.raises(MemoryFormatError, match="tombstones.parquet is corrupt"):
        Memory.open(root)


def test_probe_shards_needs_a_kmeans_memory(tmp_path, data):
    root = str(tmp_path / "m")
    _write(root, data)
    with Memory.open(root) as mem:
        with pytest.raises(ValueError, match="probe_shards needs a k-means partitioned memory"):
            mem.search(data[4], 5, probe_shards=1)


def test_gc_keeps_current_and_leased_versions(tmp_path, data):
    x, labels, ids, source, q = data
    root = str(tmp_path / "m")
    _write(root, data)
    remove_items(root, ids=["it-0001"])
    remove_items(root, ids=["it-0002"])
    reader = Memory.open(root, version=1, lease_s=600)
    try:
        assert leases.held_versions(root) and 1 in leases.held_versions(root)
        report = collect_garbage(root, keep=1)
        assert report["kept_versions"] == [1, 3] and report["deleted_versions"] == [2]
        assert report["deleted_paths"] == 2  # version 2's tombstones and forget list
        assert [h["version"] for h in version_history(root)] == [1, 3]
        with Memory.open(root, version=1) as again:  # still whole: the lease protected it
            assert len(again) == 1500
    finally:
        reader.close()
    assert not leases.held_versions(root)
    # An expired lease protects nothing.
    leases.acquire(root, 1, 0.05)
    time.sleep(0.1)
    report = collect_garbage(root, keep=1)
    assert report["kept_versions"] == [3] and report["deleted_versions"] == [1]
    with Memory.open(root) as mem:  # version 3 still uses the shards version 1 wrote
        assert len(mem) == 1498 and not {"it-0001", "it-0002"} & set(mem.search(q, 40).ids.ravel())
    with pytest.raises(ValueError, match="--keep must be >= 1"):
        collect_garbage(root, keep=0)


def test_plan_compaction_picks_dirty_and_split_partitions():
    def entry(name, path, part=None):
        return mf.ShardEntry(name=name, path=path, count=10, backend="exact", params={}, files={}, partition=part)

    manifest = mf.Manifest.new(version=3, dim=4, class_names=["a"], backend="exact",
                               partitioning=mf.Partitioning("hash", num_shards=3), shards=[
        entry("shard-00000-of-00003", "shards/v1/shard-00000-of-00003"),
        entry("shard-00001-of-00003", "shards/v1/shard-00001-of-00003"),
        entry("shard-00002-of-00003", "shards/v1/shard-00002-of-00003"),
        entry("shard-00002-of-00003-add-v00000003", "shards/v3.x/shard-00002-of-00003-add-v00000003", 2),
    ])
    dead = {"shards/v1/shard-00000-of-00003": {"b", "a"}}
    groups = plan_compaction(manifest, dead)
    assert [(g["partition"], g["name"], len(g["sources"])) for g in groups] == [
        (0, "shard-00000-of-00003", 1), (2, "shard-00002-of-00003", 2)]
    assert groups[0]["sources"][0]["dead"] == ["a", "b"]
    assert groups[1]["sources"][1]["entry"] == manifest.shards[3]
    assert [g["partition"] for g in plan_compaction(manifest, dead, merge=False)] == [0]
    assert plan_compaction(manifest, {}, merge=False) == []


def test_remove_cli_is_durable_and_versions_lists_it(tmp_path, data):
    import subprocess
    import sys

    vismem = os.path.join(os.path.dirname(sys.executable), "vismem")
    root = str(tmp_path / "m")
    _write(root, data)
    res = subprocess.run([vismem, "remove", root, "--label", "c0", "--reason", "bad class"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["removed"] == int((data[1] == 0).sum())
    res = subprocess.run([vismem, "versions", root], capture_output=True, text=True, timeout=120)
    assert [v["change"] for v in json.loads(res.stdout)] == ["write", "remove"]
    res = subprocess.run([vismem, "remove", root], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "one of the arguments --ids --label --source is required" in res.stderr


def test_a_version_with_removals_is_format_2_so_older_readers_refuse_it(tmp_path):
    from conftest import clustered
    from memory import manifest as mf
    from memory import write_memory
    from memory.mutations import remove_items

    x, labels = clustered(100, 8, 2, seed=3)
    root = str(tmp_path / "m")
    write_memory(root, x, labels, [f"i{i}" for i in range(100)], class_names=["a", "b"])
    assert mf.read_manifest(root).format_version == 1
    remove_items(root, ids=["i1", "i2"])
    assert mf.read_manifest(root).format_version == mf.REMOVALS_FORMAT_VERSION == 2
    assert mf.read_manifest(root, 1).format_version == 1


def _id_files(tmp_path):
    """One bad id file (or folder) per kind, with the line its refusal must contain."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "folder").mkdir()
    pq.write_table(pa.table({"ident": ["it-0001"]}), tmp_path / "wrong-column.parquet")
    pq.write_table(pa.table({"id": pa.array([1.5, 2.5])}), tmp_path / "floats.parquet")
    pq.write_table(pa.table({"id": pa.array(["it-0001", None])}), tmp_path / "nulls.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    return {
        "empty.txt": "holds no ids: nothing to remove",
        "folder": "is a folder (Is a directory): give a text file",
        "wrong-column.parquet": "has no 'id' column (its columns: ident)",
        "floats.parquet": "column 'id' holds double, not strings or integers",
        "nulls.parquet": "column 'id' has 1 empty values",
        "broken.parquet": "is not a readable Parquet file",
        "binary.txt": "is neither UTF-8 text (one id per line) nor Parquet",
        "missing.txt": "id file not found",
    }


def test_bad_id_files_are_one_line_errors_that_publish_nothing(tmp_path, data, capsys):
    from cli.main import main

    root = str(tmp_path / "m")
    _write(root, data)
    for name, message in _id_files(tmp_path).items():
        with pytest.raises((ValueError, OSError), match=re.escape(message)):
            read_id_file(str(tmp_path / name))
        assert main(["remove", root, "--ids", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vismem remove: error: id file ") and err.count("\n") == 1, err
        assert message in err and "pyarrow" not in err and "Traceback" not in err, err
    assert mf.list_versions(root) == [1]
    import pyarrow as pa
    import pyarrow.parquet as pq

    ok = pa.table({"id": ["it-0001", "it-0001", "it-0002"], "note": ["a", "b", "c"]})
    pq.write_table(ok, tmp_path / "ok.parquet")
    assert read_id_file(str(tmp_path / "ok.parquet")) == ["it-0001", "it-0002"]  # repeats dropped


@pytest.mark.parametrize("argv, message", [
    (["remove", "{m}", "--source", "nowhere"], "has source 'nowhere': nothing to remove (sources: curated, web)"),
    (["remove", "{m}", "--source", ""], "the source to remove is empty"),
    (["remove", "{m}", "--label", "c9"], "unknown class 'c9'"),
    (["remove", "{tmp}/no-memory", "--label", "c1"], "no memory at"),
    (["gc", "{m}", "--keep", "0"], "--keep must be >= 1"),
    (["gc", "{m}", "--keep", "-3"], "--keep must be >= 1"),
    (["gc", "{tmp}/no-memory", "--keep", "1"], "no memory at"),
    (["versions", "{tmp}/no-memory"], "no memory at"),
])
def test_bad_remove_gc_and_versions_input_is_one_line_and_changes_nothing(tmp_path, data, capsys, argv, message):
    from cli.main import main

    root = str(tmp_path / "m")
    _write(root, data)
    before = sorted(os.listdir(root))
    argv = [a.format(m=root, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vismem {argv[0]}: error: ") and err.count("\n") == 1 and message in err, err
    assert mf.list_versions(root) == [1] and sorted(os.listdir(root)) == before


def test_library_refusals_and_removals_with_nothing_left_to_do(tmp_path, data):
    root = str(tmp_path / "m")
    _write(root, data)
    for kwargs, message in [({"ids": []}, "no ids given"), ({"ids": "it-0001"}, "a list of ids, not one string"),
                            ({"ids": ["it-0001", ""]}, "an empty id cannot be removed"),
                            ({"source": "nowhere"}, "has source 'nowhere'"),
                            ({"label": " "}, "the label to remove is empty")]:
        with pytest.raises(ValueError, match=message):
            remove_items(root, **kwargs)
    with pytest.raises(ValueError, match="must be >= 1"):
        collect_garbage(root, keep=True)
    assert mf.list_versions(root) == [1]
    first = remove_items(root, source="web")
    assert first["changed"] and first["version"] == 2 and first["removed"] == 150
    again = remove_items(root, source="web")  # already removed and forgotten: nothing to publish
    assert not again["changed"] and again["version"] == 2 and again["already_removed"] == 150
    twice = remove_items(root, ids=["it-0613", "it-0613", "never-held"])
    assert twice["changed"] and twice["removed"] == 1 and twice["forgotten"] == 2 and twice["not_found"] == 1
    assert not remove_items(root, ids=["it-0613", "never-held"])["changed"]
    assert mf.list_versions(root) == [1, 2, 3]


def test_a_writer_lease_keeps_its_parent_and_folders_from_gc_until_it_ends(tmp_path, data):
    import subprocess

    root = str(tmp_path / "m")
    _write(root, data)
    with leases.writer_lease(root, "tok123", holder="test writer") as parent:
        assert parent.version == 1
        folder = tmp_path / "m" / "shards" / "v00000002.tok123" / "shard-00000-of-00003.a1"
        folder.mkdir(parents=True)
        (folder / "items.parquet").write_bytes(b"being written")
        remove_items(root, ids=["it-0001"])
        remove_items(root, ids=["it-0002"])  # versions 2 and 3: the writer's folder is now 'old'
        report = collect_garbage(root, keep=1)
        assert report["kept_versions"] == [1, 3] and folder.exists()
    report = collect_garbage(root, keep=1)  # the writer is done: its leftovers and its parent go
    assert report["deleted_versions"] == [1] and not folder.exists()
    assert report["expired_leases_deleted"] == 0 and not os.listdir(tmp_path / "m" / "leases")

    # The lease of a writer whose process is gone (killed) holds nothing on this host, and gc prunes it.
    path = leases.acquire(root, 3, 600, token="deadbeef")
    gone = subprocess.Popen(["true"])
    gone.wait()
    body = json.loads(open(path).read())
    open(path, "w").write(json.dumps({**body, "pid": gone.pid}))
    assert leases.held_tokens(root) == set() and leases.held_versions(root) == {}
    assert collect_garbage(root, keep=1)["expired_leases_deleted"] == 1 and not os.path.exists(path)
