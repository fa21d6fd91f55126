"""Every bad input a verb meets is one clear error line, exit 2, and changes nothing on disk.

One case per kind of mistake: numbers out of range, folders where files belong and files where folders
belong, missing or unreadable inputs, empty inputs, NaN and zero vectors, wrong dimensions, labels
outside the class list, encoders that differ, and corrupt manifests. Each runs the real verb in this
process on real files; the folder holding them must be byte-for-byte the same afterwards.
"""
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.main import main
from conftest import clustered
from memory import schema, write_memory
from memory.encoder_spec import EncoderSpec

LITE0 = EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 64, "rgb (x - 127) / 128")


def _shard(path, x, labels, spec=LITE0, prefix="q"):
    schema.write_embeddings(str(path), schema.embedding_table([f"{prefix}{i}" for i in range(len(x))], x, labels,
                                                              metadata=spec.to_metadata() if spec else None))


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    x, labels = clustered(300, 12, 3, seed=1, noise=0.2)
    write_memory(str(d / "mem"), x[:200], labels[:200], [f"m{i}" for i in range(200)], num_shards=2,
                 class_names=list("abc"), encoder=LITE0.to_manifest())
    _shard(d / "q.parquet", x[200:], labels[200:])
    _shard(d / "q96.parquet", x[200:], labels[200:], EncoderSpec("efficientnet-lite0", "imagenet-0.1.0", 96))
    _shard(d / "qbadlab.parquet", x[200:], labels[200:] + 5)
    nan, zero = x[200:].copy(), x[200:].copy()
    nan[3, 2], zero[4] = np.nan, 0
    _shard(d / "qnan.parquet", nan, labels[200:])
    _shard(d / "qzero.parquet", zero, labels[200:])
    _shard(d / "q6.parquet", x[200:, :6], labels[200:])
    _shard(d / "empty.parquet", x[:0], labels[:0])
    (d / "garbage.parquet").write_bytes(b"not parquet" * 20)
    pq.write_table(pa.table({"a": [1, 2]}), d / "wrongcols.parquet")
    (d / "emptydir").mkdir()
    (d / "outdir").mkdir()
    (d / "afile.txt").write_text("hello\n")
    (d / "emb").mkdir()
    _shard(d / "emb" / "a.parquet", x[:150], labels[:150], prefix="e")
    (d / "junk").mkdir()
    (d / "junk" / "a.parquet").write_bytes(b"junk" * 50)
    (d / "labelmap.json").write_text("{not json")
    pq.write_table(pa.table({"img": [b"png bytes"] * 3, "label": [0, 1, 2]}), d / "images.parquet")
    (d / "imgsrc").mkdir()
    (d / "imgsrc" / "bad.parquet").write_bytes(b"junk" * 50)
    for name, shards in (("mem_badshards", {"x": 1}), ("mem_badjson", None)):
        os.system(f"cp -r '{d / 'mem'}' '{d / name}'")
        manifest = d / name / "manifests" / "v00000001.json"
        if shards is None:
            manifest.write_text("{not json")
        else:
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "shards": shards}))
    return d


M, Q = "{d}/mem", "{d}/q.parquet"
EV = ["--out", "{d}/ev", "--k-max", "5"]
BUILD = ["build", "{d}/emb", "{d}/new", "--num-shards", "1", "--class-names", "a,b,c"]
EMBED = ["embed", "fashion-mnist", "{d}/e", "--limit", "4"]
EXP = ["experiment", "pruning", "{d}/emb", Q, "--out", "{d}/rep"]
CASES = {
    # query: sizes, outputs, query files, voting parameters, memories
    "query k above live items": (["query", M, Q, "--k", "100000000"], "k 100000000 exceeds the 200 live items"),
    "query k 0": (["query", M, Q, "--k", "0"], "argument --k: must be an integer >= 1, got 0"),
    "query batch-size 0": (["query", M, Q, "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    "query out is a folder": (["query", M, Q, "--out", "{d}/outdir"], "is a folder; name a file"),
    "query out under a file": (["query", M, Q, "--out", "{d}/afile.txt/p.parquet"],
                               "afile.txt is a file, not a folder"),
    "query labels outside the classes": (["query", M, "{d}/qbadlab.parquet"], "labels reach 7, but memory"),
    "query other image size": (["query", M, "{d}/q96.parquet"], "encoders differ in image_size"),
    "query wrong dimension": (["query", M, "{d}/q6.parquet"], "must have shape (n, 12)"),
    "query NaN vector": (["query", M, "{d}/qnan.parquet"], "NaN or infinite"),
    "query zero vector": (["query", M, "{d}/qzero.parquet"], "all-zero rows"),
    "query no rows": (["query", M, "{d}/empty.parquet"], "hold no rows"),
    "query unreadable parquet": (["query", M, "{d}/garbage.parquet"], "garbage.parquet is not a readable Parquet file"),
    "query not an embedding shard": (["query", M, "{d}/wrongcols.parquet"], "not an embedding shard"),
    "query folder without shards": (["query", M, "{d}/emptydir"], "no embedding shards match"),
    "query tau nan": (["query", M, Q, "--method", "softmax", "--tau", "nan"], "--tau: must be a finite number"),
    "query xi inf": (["query", M, Q, "--method", "distance", "--xi", "inf"], "--xi: must be a finite number"),
    "query alpha 0": (["query", M, Q, "--alpha", "0"], "--alpha: must be a number > 0"),
    "query version 0": (["query", M, Q, "--version", "0"], "--version: must be an integer >= 1"),
    "query version absent": (["query", M, Q, "--version", "9"], "has no version 9"),
    "query memory is a file": (["query", Q, Q], "holds no published memory"),
    "query abstain-below 1.5": (["query", M, Q, "--abstain-below", "1.5"],
                                "--abstain-below: must be a number in [0, 1], got 1.5"),
    "query abstain-below -0.1": (["query", M, Q, "--abstain-below", "-0.1"], "--abstain-below: must be a number in"),
    "query abstain-below nan": (["query", M, Q, "--abstain-below", "nan"], "--abstain-below: must be a finite number"),
    "query unknown tie rule": (["query", M, Q, "--ties", "foo"], "--ties: invalid choice: 'foo'"),
    "query probe-shards on a hash memory": (["query", M, Q, "--probe-shards", "1"], "needs a k-means partitioned"),
    "query manifest shards not a list": (["query", "{d}/mem_badshards", Q], "field 'shards' must be a list, got dict"),
    "query manifest not JSON": (["query", "{d}/mem_badjson", Q], "is corrupt"),
    "info manifest shards not a list": (["info", "{d}/mem_badshards"], "field 'shards' must be a list"),
    "info version -1": (["info", M, "--version", "-1"], "--version: must be an integer >= 1"),
    # eval
    "eval out is a file": (["eval", M, Q, "--out", "{d}/afile.txt"], "afile.txt is a file; name a folder"),
    "eval k-max above live items": (["eval", M, Q, "--out", "{d}/ev", "--k-max", "100000000"],
                                    "k-max 100000000 exceeds"),
    "eval batch-size 0": (["eval", M, Q, *EV, "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    "eval labels outside the classes": (["eval", M, "{d}/qbadlab.parquet", *EV], "labels reach 7"),
    "eval NaN query": (["eval", M, "{d}/qnan.parquet", *EV], "NaN or infinite"),
    "eval ood missing": (["eval", M, Q, *EV, "--ood", "{d}/nope.parquet"], "embedding shard not found"),
    "eval ood other image size": (["eval", M, Q, *EV, "--ood", "{d}/q96.parquet"], "encoders differ in image_size"),
    "eval memory missing": (["eval", "{d}/nomem", Q, *EV], "no memory at"),
    "eval unknown tie rule": (["eval", M, Q, *EV, "--ties", "first"], "--ties: invalid choice: 'first'"),
    "eval rerank-k 0": (["eval", M, Q, *EV, "--rerank-k", "0"], "--rerank-k: must be an integer >= 1"),
    # build and add: refused before any Beam work, nothing published
    "build num-shards 0": (["build", "{d}/emb", "{d}/new", "--num-shards", "0", "--class-names", "a"],
                           "--num-shards: must be an integer >= 1"),
    "build out is a file": (["build", "{d}/emb", "{d}/afile.txt", "--num-shards", "1", "--class-names", "a,b,c"],
                            "afile.txt is a file; name a folder"),
    "build dim 0": ([*BUILD, "--dim", "0"], "--dim: must be an integer >= 1"),
    "build kmeans-sample 0": ([*BUILD, "--partition", "kmeans", "--kmeans-sample", "0"], "--kmeans-sample: must be"),
    "build norm-tolerance nan": ([*BUILD, "--norm-tolerance", "nan"], "--norm-tolerance: must be a finite number"),
    "build scann-reorder -1": ([*BUILD, "--scann-reorder", "-1"], "--scann-reorder: must be an integer >= 1"),
    "build scann-num-leaves 0": ([*BUILD, "--scann-num-leaves", "0"], "--scann-num-leaves: must be an integer >= 1"),
    "build class names empty": (["build", "{d}/emb", "{d}/new", "--num-shards", "1", "--class-names", ""],
                                "--class-names is empty"),
    "build unreadable shards only": (["build", "{d}/junk", "{d}/new", "--num-shards", "1", "--class-names", "a"],
                                     "junk/a.parquet: not a readable Parquet file (Parquet magic bytes not found"),
    "build into a memory": (["build", "{d}/emb", M, "--num-shards", "1", "--class-names", "a,b,c"],
                            "a memory already exists"),
    "build dimension not the inputs'": ([*BUILD, "--dim", "5"], "hold 12-d embeddings, none of dimension 5"),
    "build no rows": (["build", "{d}/empty.parquet", "{d}/new", "--num-shards", "1", "--class-names", "a"],
                      "hold no rows"),
    "add other image size": (["add", M, "{d}/q96.parquet"], "encoders differ in image_size"),
    "add wrong dimension": (["add", M, "{d}/q6.parquet"], "hold 6-d embeddings, none of dimension 12"),
    "add no rows": (["add", M, "{d}/empty.parquet"], "hold no rows"),
    "add memory is a file": (["add", Q, "{d}/emb"], "holds no published memory"),
    "add class names not extending": (["add", M, "{d}/emb", "--class-names", "x,y"], "must start with the memory's"),
    "compact memory missing": (["compact", "{d}/nomem"], "no memory at"),
    # embed and probe: refused before Ray starts or any output is written
    "embed batch-size 0": ([*EMBED, "--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    "embed max-pixels 0": ([*EMBED, "--max-pixels", "0"], "--max-pixels: must be an integer >= 1"),
    "embed num-workers 0": ([*EMBED, "--num-workers", "0"], "--num-workers: must be an integer >= 1"),
    "embed threads-per-worker 0": ([*EMBED, "--threads-per-worker", "0"], "--threads-per-worker: must be"),
    "embed min-confidence 1.5": ([*EMBED, "--min-confidence", "1.5"], "--min-confidence: must be a number in [0, 1]"),
    "embed image-size 4": ([*EMBED, "--image-size", "4"], "image size must be >= 8"),
    "embed out is a file": (["embed", "fashion-mnist", "{d}/afile.txt"], "afile.txt is a file; name a folder"),
    "embed unknown split": ([*EMBED, "--split", "valid"], "split must be one of train, test"),
    "embed empty source folder": (["embed", "{d}/emptydir", "{d}/e"], "is an empty folder"),
    "embed source a text file": (["embed", "{d}/afile.txt", "{d}/e"], "cannot tell the kind of source"),
    "embed source missing": (["embed", "{d}/nosrc", "{d}/e"], "source not found"),
    "embed label map not JSON": ([*EMBED, "--teacher", "efficientnet-lite0", "--label-map", "{d}/labelmap.json"],
                                 "is not valid JSON"),
    "embed parquet without the image column": (["embed", "{d}/images.parquet", "{d}/e"],
                                               "no image column 'image' (columns: img, label)"),
    "embed unreadable parquet": (["embed", "{d}/imgsrc", "{d}/e", "--source-kind", "parquet"],
                                 "bad.parquet is not a readable Parquet file"),
    "embed unknown encoder": ([*EMBED, "--encoder", "resnet9000"], "unknown encoder 'resnet9000'"),
    "probe out is a folder": (["probe", Q, "--out", "{d}/outdir"], "is a folder; name a file"),
    "probe max-iter 0": (["probe", Q, "--out", "{d}/p.npz", "--max-iter", "0"], "--max-iter: must be an integer >= 1"),
    "probe l2 negative": (["probe", Q, "--out", "{d}/p.npz", "--l2", "-1"], "--l2: must be a number >= 0"),
    "probe shards missing": (["probe", "{d}/nope", "--out", "{d}/p.npz"], "no embedding run or shard"),
    # experiment
    "experiment out is a file": (["experiment", "scaling", "{d}/emb", Q, "--out", "{d}/afile.txt"], "is a file"),
    "experiment k 0": ([*EXP, "--k", "0"], "--k: must be an integer >= 1"),
    "experiment unknown tie rule": ([*EXP, "--ties", "foo"], "--ties: invalid choice: 'foo'"),
    "experiment thresholds not numbers": ([*EXP, "--thresholds", "abc"], "must be a comma list of integers"),
    "experiment forget-fraction 1": (["experiment", "unlearning", "{d}/emb", Q, "--out", "{d}/rep",
                                      "--forget-fraction", "1"], "--forget-fraction must be between 0 and 1"),
    "experiment unknown new class": (["experiment", "new-classes", "{d}/emb", Q, "--out", "{d}/rep", "--new", "zz",
                                      "--class-names", "a,b,c"], "--new names 'zz', not among the classes"),
    "experiment unknown held-out class": (["experiment", "granularity", "{d}/emb", Q, "--out", "{d}/rep", "--tree",
                                           "{d}/nope.json", "--held-out", "zz", "--class-names", "a,b,c"],
                                          "--held-out names 'zz'"),
    "experiment tree missing": (["experiment", "granularity", "{d}/emb", Q, "--out", "{d}/rep", "--tree",
                                 "{d}/nope.json", "--held-out", "a", "--class-names", "a,b,c"], "--tree: no such file"),
    "experiment other encoder": (["experiment", "scaling", "{d}/emb", "{d}/q96.parquet", "--out", "{d}/rep"],
                                 "encoders differ in image_size"),
    "experiment labels outside the classes": (["experiment", "scaling", "{d}/emb", "{d}/qbadlab.parquet", "--out",
                                               "{d}/rep", "--class-names", "a,b,c"], "labels reach 7"),
    "experiment no labelled rows": (["experiment", "scaling", "{d}/emb", "{d}/empty.parquet", "--out", "{d}/rep"],
                                    "hold no labelled rows"),
    # demo: refused before minutes of embedding
    "demo train 0": (["demo", "--out", "{d}/demo", "--train", "0"], "--train: must be an integer >= 1"),
    "demo out is a file": (["demo", "--out", "{d}/afile.txt"], "is a file; name a folder"),
    "demo k-max above train": (["demo", "--out", "{d}/demo", "--train", "50", "--k-max", "100"], "exceeds the 50"),
    "demo image-size 4": (["demo", "--out", "{d}/demo", "--image-size", "4"], "image size must be >= 8"),
    "demo all labels hidden": (["demo", "--out", "{d}/demo", "--unlabelled-fraction", "1"], "must be below 1"),
    "demo unknown compare encoder": (["demo", "--out", "{d}/demo", "--compare-encoders", "bogus"], "unknown encoder"),
}


def _state(d) -> dict:
    """Every path under ``d`` with its content hash (folders as such)."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            path = os.path.join(root, name)
            out[os.path.relpath(path, d)] = "folder"
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, d)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(d, case, capsys):
    argv, fragment = CASES[case]
    argv = [a.replace("{d}", str(d)) for a in argv]
    before = _state(d)
    try:
        rc = main(argv)
    except SystemExit as exc:  # refused by the parser: its usage, then the one error line
        rc = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert rc == 2, err
    assert "Traceback" not in "\n".join(err)
    verb = argv[0]
    errors = [line for line in err if line.startswith(f"vismem {verb}")]
    assert len(errors) == 1 and ": error: " in errors[0] and fragment in errors[0], err
    assert errors[0] == err[-1], err
    assert _state(d) == before
