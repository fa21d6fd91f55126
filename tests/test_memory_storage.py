"""memory.storage on local paths: joins, atomic writes, listings, checksums, directory publishing."""
import hashlib
import os

import pytest

from memory import storage


def test_join_and_is_remote():
    assert storage.join("gs://b/m/", "/shards/", "x") == "gs://b/m/shards/x"
    assert storage.join("/tmp/m", "manifests", "v1.json") == "/tmp/m/manifests/v1.json"
    assert storage.is_remote("gs://b/m") and not storage.is_remote("/tmp/m")
    assert not storage.is_remote("file:///tmp/m")


def test_atomic_write_replaces_whole_and_leaves_no_temporaries(tmp_path):
    path = str(tmp_path / "a" / "b.bin")  # parent folders are created
    storage.write_bytes_atomic(path, b"first")
    storage.write_bytes_atomic(path, b"second, longer")
    assert storage.read_bytes(path) == b"second, longer"
    assert os.listdir(tmp_path / "a") == ["b.bin"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "m.json")
    storage.write_bytes_atomic(path, b"old")

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        storage.write_bytes_atomic(path, b"new")
    assert open(path, "rb").read() == b"old"


def test_list_names_and_find_files(tmp_path):
    root = tmp_path / "d"
    for rel in ("b.parquet", "a.parquet", "sub/c.parquet", "sub/notes.txt", ".hidden/x.parquet", "sub/.y.parquet"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    assert storage.list_names(str(root)) == [".hidden", "a.parquet", "b.parquet", "sub"]
    assert storage.list_names(str(tmp_path / "missing")) == []
    d = str(root)
    assert storage.find_files(d, ".parquet") == [f"{d}/a.parquet", f"{d}/b.parquet", f"{d}/sub/c.parquet"]
    assert storage.find_files(d) == [f"{d}/a.parquet", f"{d}/b.parquet", f"{d}/sub/c.parquet", f"{d}/sub/notes.txt"]
    assert storage.find_files(f"{d}/*.parquet") == [f"{d}/a.parquet", f"{d}/b.parquet"]
    # A plain path comes back as it is, so its reader names it when it is missing.
    assert storage.find_files(f"{d}/nothing.parquet", ".parquet") == [f"{d}/nothing.parquet"]


def test_checksums_and_describe_dir(tmp_path):
    (tmp_path / "s" / "scann").mkdir(parents=True)
    (tmp_path / "s" / "items.parquet").write_bytes(b"items")
    (tmp_path / "s" / "scann" / "index.pb").write_bytes(b"x" * 10)
    described = storage.describe_dir(str(tmp_path / "s"))
    assert list(described) == ["items.parquet", "scann/index.pb"]
    assert described["scann/index.pb"] == {"sha256": hashlib.sha256(b"x" * 10).hexdigest(), "bytes": 10}
    assert storage.sha256_file(str(tmp_path / "s" / "items.parquet")) == hashlib.sha256(b"items").hexdigest()


def test_publish_dir_replaces_and_fetch_dir_is_local(tmp_path):
    src = tmp_path / "build"
    src.mkdir()
    (src / "f.txt").write_text("new")
    dest = tmp_path / "mem" / "shard"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old")
    storage.publish_dir(str(src), str(dest))
    assert sorted(os.listdir(dest)) == ["f.txt"]
    assert sorted(os.listdir(tmp_path / "mem")) == ["shard"]  # no temporary left beside it
    assert storage.fetch_dir(str(dest), ["f.txt"]) == str(dest)


def test_remove_is_quiet_when_missing(tmp_path):
    storage.remove(str(tmp_path / "never"))
    (tmp_path / "t" / "u").mkdir(parents=True)
    storage.remove(str(tmp_path / "t"), recursive=True)
    assert not storage.exists(str(tmp_path / "t"))


def test_create_new_refuses_an_existing_file_and_leaves_no_temporaries(tmp_path):
    path = str(tmp_path / "d" / "v.json")
    storage.create_new(path, b"first")
    with pytest.raises(FileExistsError):
        storage.create_new(path, b"second")
    assert storage.read_bytes(path) == b"first" and os.listdir(tmp_path / "d") == ["v.json"]


def test_create_new_has_exactly_one_winner_among_racing_writers(tmp_path):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    path = str(tmp_path / "v.json")
    start = threading.Barrier(8)

    def create(i):
        start.wait()
        try:
            storage.create_new(path, f"writer {i}".encode())
            return i
        except FileExistsError:
            return None

    with ThreadPoolExecutor(8) as pool:
        winners = [i for i in pool.map(create, range(8)) if i is not None]
    assert len(winners) == 1 and storage.read_bytes(path) == f"writer {winners[0]}".encode()
    assert os.listdir(tmp_path) == ["v.json"]


def test_create_new_without_hard_links_uses_an_exclusive_create(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError("this file system has no hard links")

    monkeypatch.setattr(os, "link", no_links)
    path = str(tmp_path / "v.json")
    storage.create_new(path, b"first")
    with pytest.raises(FileExistsError):
        storage.create_new(path, b"second")
    assert storage.read_bytes(path) == b"first" and os.listdir(tmp_path) == ["v.json"]
