"""Fewer flags: ``vismem build`` takes the class names the shards record and a shard count from their size.

``vismem embed`` records its source's class names in every shard's schema metadata
(``memory.schema.CLASS_NAMES_KEY``); a build reads them from the Parquet footers, so
``--class-names`` is needed only for shards that record none. Shards that disagree, or an explicit
``--class-names`` that differs from theirs, are refused. ``--num-shards`` defaults to
``ceil(rows / 150,000)`` from the footers' row counts.
"""
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from cli.main import main
from conftest import clustered
from memory import manifest as mf
from memory import schema, write_memory
from pipelines import build_config
from pipelines.build import add_to_memory, build_memory
from pipelines.sources import FASHION_MNIST_CLASSES

VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")
PIPE = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
NAMES = ["cat", "dog", "owl"]


def _shard(path, n=60, seed=1, names=NAMES, prefix="i", dim=8):
    x, labels = clustered(n, dim, 3, seed=seed)
    meta = schema.class_names_metadata(names) if names else None
    schema.write_embeddings(str(path), schema.embedding_table([f"{prefix}{i}" for i in range(n)], x, labels,
                                                              metadata=meta))
    return str(path)


def test_embed_records_the_class_names_and_build_needs_no_flags(tmp_path):
    env = {**os.environ, "VISMEM_LOG_DIR": str(tmp_path / "logs")}
    emb = tmp_path / "fm"
    res = subprocess.run([VISMEM, "embed", "fashion-mnist", str(emb), "--split", "test", "--limit", "40",
                          "--shard-size", "20", "--image-size", "32", "--batch-size", "20"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in sorted(os.listdir(emb / "embeddings")):
        meta = pq.read_schema(emb / "embeddings" / name).metadata
        assert json.loads(meta[schema.CLASS_NAMES_KEY.encode()]) == FASHION_MNIST_CLASSES
    mem = tmp_path / "m"
    res = subprocess.run([VISMEM, "build", str(emb / "embeddings"), str(mem), "--backend", "exact"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "10 classes (recorded in the shards) -> 1 hash shard (default: at most 150,000 items per shard)" in res.stderr
    m = mf.read_manifest(str(mem))
    assert m.class_names == FASHION_MNIST_CLASSES and m.num_partitions == 1 and m.count == 40


def test_shards_that_disagree_on_class_names_are_refused_naming_both(tmp_path, capsys):
    a = _shard(tmp_path / "a.parquet")
    b = _shard(tmp_path / "b.parquet", seed=2, names=["cat", "dog", "emu"], prefix="j")
    assert main(["build", str(tmp_path / "*.parquet"), str(tmp_path / "m"), "--backend", "exact"]) == 2
    err = capsys.readouterr().err
    assert err == (f"vismem build: error: the embedding shards disagree on their class names: {b} has [cat, dog, "
                   f"emu] (3), {a} has [cat, dog, owl] (3)\n"), err
    assert not (tmp_path / "m").exists()


def test_an_explicit_class_list_must_match_the_shards_and_is_needed_without_one(tmp_path, capsys):
    a = _shard(tmp_path / "a.parquet")
    assert main(["build", a, str(tmp_path / "m"), "--class-names", "cat,dog,emu"]) == 2
    err = capsys.readouterr().err
    assert err == (f"vismem build: error: --class-names [cat, dog, emu] (3) differ from the class names the embedding "
                   f"shards record, [cat, dog, owl] (3) (in {a}), which their labels index: leave --class-names out "
                   "to use them\n"), err
    plain = _shard(tmp_path / "plain.parquet", names=None)
    assert main(["build", plain, str(tmp_path / "m")]) == 2
    assert "the embedding shards record none (shards from 'vismem embed' do): pass --class-names a,b,c" in (
        capsys.readouterr().err)
    assert not (tmp_path / "m").exists()
    # The same names given explicitly, and names for shards that record none, are taken.
    build_memory(a, str(tmp_path / "same"), class_names=NAMES, backend="exact", pipeline_args=PIPE)
    build_memory(plain, str(tmp_path / "given"), class_names=["x", "y", "z"], backend="exact", pipeline_args=PIPE)
    assert mf.read_manifest(str(tmp_path / "same")).class_names == NAMES
    assert mf.read_manifest(str(tmp_path / "given")).class_names == ["x", "y", "z"]


def test_add_extends_the_memory_by_the_recorded_names_or_refuses_other_names(tmp_path):
    x, labels = clustered(60, 8, 3, seed=3)
    root = str(tmp_path / "m")
    write_memory(root, x, labels, [f"m{i}" for i in range(60)], class_names=NAMES)
    more = _shard(tmp_path / "more.parquet", seed=4, names=NAMES + ["emu"], prefix="n")
    add_to_memory(root, more, pipeline_args=PIPE)
    assert mf.read_manifest(root).class_names == NAMES + ["emu"]
    other = _shard(tmp_path / "other.parquet", seed=5, names=["0", "1", "2"], prefix="o")
    with pytest.raises(ValueError, match=r"record the classes \[0, 1, 2\] \(3\) .* which neither are nor extend .*"
                                         r"\[cat, dog, owl, emu\] \(4\): their labels would name other classes"):
        add_to_memory(root, other, pipeline_args=PIPE)


def test_the_default_shard_count_follows_the_row_count(tmp_path, monkeypatch):
    assert [build_config.default_num_shards(n) for n in (0, 1, 150_000, 150_001, 1_000_000, 60_000)] == [
        1, 1, 1, 2, 7, 1]
    assert build_config.default_num_shards(250, target=100) == 3
    monkeypatch.setattr(build_config, "TARGET_SHARD_ITEMS", 25)  # 60 rows: 3 shards of at most 25
    summary = build_memory(_shard(tmp_path / "a.parquet"), str(tmp_path / "m"), backend="exact", pipeline_args=PIPE)
    assert len(summary["shards"]) == 3 and mf.read_manifest(str(tmp_path / "m")).num_partitions == 3


def test_help_states_the_rules(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    words = " ".join(capsys.readouterr().out.split())
    assert "default: ceil(rows / 150,000) from the Parquet footers' row counts" in words
    assert "100k-150k items per shard" in words and "trees from 5,000 items per shard" in words
    assert "Default: the names the embedding shards record" in words and "differ from the shards' are refused" in words


def test_class_names_metadata_round_trips_and_rejects_garbage():
    meta = schema.class_names_metadata(NAMES)
    assert schema.class_names_from_metadata(meta) == NAMES and schema.class_names_metadata([]) == {}
    assert schema.class_names_from_metadata({}) is None
    with pytest.raises(ValueError, match="must be a JSON list of names"):
        schema.class_names_from_metadata({schema.CLASS_NAMES_KEY: '{"a": 1}'}, "f.parquet")
    assert schema.agreed_class_names([("a", None), ("b", NAMES), ("c", None), ("d", NAMES)]) == (NAMES, "b")
    many = [f"c{i}" for i in range(8)]
    with pytest.raises(ValueError, match=r"y has \[c0, c1, c2, c3, c4, ...\] \(8\) with class 6 'z', x has"):
        schema.agreed_class_names([("x", many), ("y", many[:6] + ["z", "c7"])])
