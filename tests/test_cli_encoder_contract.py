"""The encoder contract at every door: build, add, query, eval and experiment refuse embeddings made by
another encoder, image size or preprocessing (same dimension), naming both sides, and change nothing."""
import json
import os

import numpy as np
import pytest

from cli.main import main
from conftest import clustered
from memory import schema, write_memory
from memory.encoder_spec import EncoderSpec

LITE0 = EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 64, "rgb (x - 127) / 128")
OTHERS = {
    "image size": (EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 96, "rgb (x - 127) / 128"), "image_size"),
    "preprocessing": (EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 64, "rgb x / 255"), "preprocessing"),
    "encoder": (EncoderSpec("efficientnet-lite2", "imagenet-0.1.0", 64, "rgb (x - 127) / 128"), "name"),
}


def _shard(path, prefix, x, labels, spec):
    schema.write_embeddings(str(path), schema.embedding_table([f"{prefix}{i}" for i in range(len(x))], x, labels,
                                                              metadata=spec.to_metadata() if spec else None))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("contract")
    x, labels = clustered(260, 12, 3, seed=4, noise=0.2)
    write_memory(str(d / "m"), x[:200], labels[:200], [f"m{i}" for i in range(200)], num_shards=2,
                 class_names=list("abc"), encoder=LITE0.to_manifest())
    _shard(d / "q.parquet", "q", x[200:], labels[200:], LITE0)
    # Recorded with fewer fields (an older embedding run): nothing it records differs, so it is accepted.
    _shard(d / "q-partial.parquet", "q", x[200:], labels[200:], EncoderSpec("efficientnet-lite0", image_size=64))
    for name, (spec, _) in OTHERS.items():
        _shard(d / f"q-{name}.parquet", "q", x[200:], labels[200:], spec)
        _shard(d / f"new-{name}.parquet", "n", x[200:], labels[200:], spec)
        (d / f"mixed-{name}").mkdir()
        _shard(d / f"mixed-{name}" / "0.parquet", "q", x[200:230], labels[200:230], LITE0)
        _shard(d / f"mixed-{name}" / "1.parquet", "r", x[230:], labels[230:], spec)
    return d, x, labels


def _files_under(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def _refused(argv, capsys, d, field, verb):
    before = _files_under(d)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vismem {verb}: error: "), err
    assert f"encoders differ in {field}" in err and "image_size=64" in err, err  # both sides named
    assert _files_under(d) == before


@pytest.mark.parametrize("other", list(OTHERS))
def test_query_and_eval_refuse_queries_embedded_otherwise(files, other, capsys):
    d, _, _ = files
    spec, field = OTHERS[other]
    q = str(d / f"q-{other}.parquet")
    _refused(["query", str(d / "m"), q, "--k", "5", "--out", str(d / "p.parquet")], capsys, d, field, "query")
    _refused(["eval", str(d / "m"), q, "--out", str(d / "ev"), "--k-max", "5"], capsys, d, field, "eval")
    _refused(["eval", str(d / "m"), str(d / "q.parquet"), "--out", str(d / "ev"), "--k-max", "5", "--ood", q],
             capsys, d, field, "eval")
    # A folder of shards where one of them differs: refused before the memory is searched.
    _refused(["query", str(d / "m"), str(d / f"mixed-{other}")], capsys, d, field, "query")


def test_the_same_encoder_is_accepted_also_when_fewer_fields_are_recorded(files, capsys):
    d, x, labels = files
    for q in ("q.parquet", "q-partial.parquet"):
        assert main(["query", str(d / "m"), str(d / q), "--k", "5"]) == 0
        assert json.loads(capsys.readouterr().out)["top1_accuracy"] > 0.9


@pytest.mark.parametrize("other", ["image size", "preprocessing"])
def test_add_and_experiment_refuse_and_build_needs_shards_that_agree(files, other, tmp_path, capsys):
    d, x, labels = files
    spec, field = OTHERS[other]
    _refused(["add", str(d / "m"), str(d / f"new-{other}.parquet")], capsys, d, field, "add")
    _refused(["experiment", "scaling", str(d / "q.parquet"), str(d / f"q-{other}.parquet"), "--out",
              str(d / "rep")], capsys, d, field, "experiment")
    # Three shards: the first records the image size only, the other two disagree on the preprocessing
    # (each agrees with the first), so only comparing every shard with every other finds it.
    emb = tmp_path / "emb"
    emb.mkdir()
    _shard(emb / "a.parquet", "a", x[:100], labels[:100], EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 64))
    _shard(emb / "b.parquet", "b", x[100:150], labels[100:150], EncoderSpec("efficientnet-lite0", preprocessing="p1"))
    _shard(emb / "c.parquet", "c", x[150:200], labels[150:200], EncoderSpec("efficientnet-lite0", preprocessing="p2"))
    assert main(["build", str(emb), str(tmp_path / "new"), "--num-shards", "1", "--class-names", "a,b,c"]) == 2
    err = capsys.readouterr().err
    assert "encoders differ in preprocessing" in err and "b.parquet" in err and "c.parquet" in err, err
    assert not (tmp_path / "new").exists()
    np.testing.assert_array_equal(schema.read_embeddings(str(emb / "a.parquet"))["labels"], labels[:100])
