"""Quiet by default: a line (or bar) per stage and a summary on the terminal, the engines' logs in a log file.

Real runs as a user runs them: ``vismem build`` on the default runner (the multi-process DirectRunner,
whose SDK workers are separate processes) and ``vismem embed`` on a local Ray, as subprocesses, so
what reaches the terminal is what the file descriptors carry. Inputs refused at the door are one
line per problem, naming the file, the column and the reason, with exit status 2.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import clustered
from memory import schema, write_memory
from pipelines.progress import MarkerWatch, mark, read_marks
from pipelines.validate import MAX_PROBLEM_LINES, BadInputs

VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")
# What the engines print: Beam's loggers and its SDK workers, gRPC, absl/glog, Python log records.
ENGINE = re.compile(r"apache_beam|sdk_worker|Worker:|grpc|absl|^[IWE]\d{4} |^(INFO|WARNING|ERROR)[ :]|Traceback")


def _run(tmp_path, *args, timeout=600):
    env = {**os.environ, "VISMEM_LOG_DIR": str(tmp_path / "state-logs")}
    return subprocess.run([VISMEM, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def _log_of(stderr: str) -> str:
    found = re.findall(r"log: (\S+\.log)", stderr)
    assert found, stderr
    return found[-1].rstrip(")")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """600 rows in 3 files, 16-d, 3 classes: a build of a few seconds that runs every stage."""
    d = tmp_path_factory.mktemp("quiet") / "emb"
    d.mkdir()
    x, labels = clustered(600, 16, 3, seed=11)
    for f in range(3):
        rows = slice(f * 200, (f + 1) * 200)
        schema.write_embeddings(str(d / f"part-{f}.parquet"),
                                schema.embedding_table([f"i{i}" for i in range(rows.start, rows.stop)], x[rows],
                                                       labels[rows]))
    return d


def test_build_shows_stages_and_a_summary_and_logs_the_engines_to_a_file(tmp_path, shards):
    out = tmp_path / "m"
    res = _run(tmp_path, "build", str(shards), str(out), "--num-shards", "2", "--class-names", "a,b,c",
               "--backend", "exact")
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout)  # stdout: the JSON result, and only it
    assert result["items_added"] == 600 and result["version"] == 1 and len(result["shards"]) == 2
    err = _lines(res.stderr)
    assert len(err) <= 15, res.stderr
    assert not [line for line in err if ENGINE.search(line)], res.stderr
    assert err[0].startswith("inputs: 3 files, 600 rows, 16-d, 3 classes")
    assert any(line.startswith("read and check: 600 rows in") for line in err), err
    assert any(line.startswith("write shards: 600 items in") for line in err), err
    assert err[-1].startswith(f"vismem build: built {out} version 1: 600 items in 2 shards"), err
    log = _log_of(err[-1])
    assert os.path.dirname(log) == str(out / "logs") and os.path.isfile(log)
    text = open(log).read()
    # The driver's Beam logs, and the multi-process runner's SDK workers' own stderr (separate processes).
    assert "apache_beam.runners.portability" in text and "sdk_worker" in text, text[:2000]
    assert "vismem.build: building" in text
    assert not os.listdir(tmp_path / "state-logs")  # the log moved into the memory folder


def test_verbose_brings_the_engines_logs_back_and_quiet_silences_the_stages(tmp_path, shards):
    loud = _run(tmp_path, "build", str(shards), str(tmp_path / "loud"), "--num-shards", "1", "--class-names",
                "a,b,c", "--backend", "exact", "-v")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "apache_beam" in loud.stderr and "sdk_worker" in loud.stderr
    assert "read and check: 600 rows" in loud.stderr
    quiet = _run(tmp_path, "build", str(shards), str(tmp_path / "quiet"), "--num-shards", "1", "--class-names",
                 "a,b,c", "--backend", "exact", "-q")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stderr == "" and json.loads(quiet.stdout)["items_added"] == 600
    assert os.listdir(tmp_path / "quiet" / "logs")  # still logged


def test_embed_shows_its_stages_and_logs_to_its_output_folder(tmp_path):
    out = tmp_path / "fm"
    res = _run(tmp_path, "embed", "fashion-mnist", str(out), "--split", "test", "--limit", "40", "--shard-size",
               "20", "--image-size", "32", "--batch-size", "20")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["counts"]["embedded"] == 40
    err = _lines(res.stderr)
    assert len(err) <= 15, res.stderr
    assert not [line for line in err if ENGINE.search(line)], res.stderr
    assert err[0].startswith("source: ") and "2 input shards, 2 to do (40 images)" in err[0], err
    assert any(line.startswith("start Ray and encoders: 1 worker in") for line in err), err
    assert any(line.startswith("embed: 40 img in") for line in err), err
    assert err[-1].startswith(f"vismem embed: embedded 40 of 40 images into {out}/embeddings"), err
    log = _log_of(err[-1])
    assert os.path.dirname(log) == str(out / "logs") and os.path.isfile(log)
    text = open(log).read()
    assert "vismem.embed: embedding" in text and "encoder workers ready" in text, text[:2000]


def _bad_inputs(d):
    x, labels = clustered(50, 16, 3, seed=12)
    (d / "empty.parquet").write_bytes(b"")
    pq.write_table(pa.table({"id": [f"v{i}" for i in range(50)], "label": labels.astype(np.int32),
                             "embedding": pa.array([list(map(float, r)) for r in x], pa.list_(pa.float64()))}),
                   d / "varlen.parquet")
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(50)], "label": [str(v) for v in labels],
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16)}),
                   d / "strlabel.parquet")
    schema.write_embeddings(str(d / "dup.parquet"), schema.embedding_table(["same"] * 50, x, labels))
    schema.write_embeddings(str(d / "dim8.parquet"), schema.embedding_table([f"e{i}" for i in range(50)],
                                                                            x[:, :8], labels))
    (d / "afile").write_text("not a folder\n")


@pytest.mark.parametrize("name, reason", [
    ("empty.parquet", "empty file (0 bytes), not a Parquet file"),
    ("varlen.parquet", "column 'embedding' is list<element: double>, must be a fixed-size list of float32 or float16 "
                       "(one length for every row)"),
    ("strlabel.parquet", "column 'label' is string, must be an integer type (int32; -1 where unknown)"),
])
def test_a_bad_input_file_is_one_line_with_file_column_and_reason(tmp_path, name, reason):
    _bad_inputs(tmp_path)
    res = _run(tmp_path, "build", str(tmp_path / name), str(tmp_path / "m"), "--num-shards", "1", "--class-names",
               "a,b,c")
    assert res.returncode == 2, res.stderr
    assert _lines(res.stderr) == [f"vismem build: error: {tmp_path / name}: {reason}"], res.stderr
    assert not (tmp_path / "m").exists() and not os.listdir(tmp_path / "state-logs")  # refused: no log kept


def test_several_bad_files_are_one_line_each_and_the_add_checks_the_same(tmp_path, shards):
    _bad_inputs(tmp_path)
    bad = [str(tmp_path / n) for n in ("empty.parquet", "varlen.parquet", "strlabel.parquet")]
    res = _run(tmp_path, "build", str(tmp_path / "*.parquet"), str(tmp_path / "m"), "--num-shards", "1",
               "--class-names", "a,b,c")
    assert res.returncode == 2
    err = _lines(res.stderr)
    assert err == [line for line in err if line.startswith("vismem build: error: ")] and len(err) == 3, err
    for path, line in zip(sorted(bad), err):
        assert path in line
    # Embeddings of another dimension than the memory's: refused before the job, naming the file.
    x, labels = clustered(100, 16, 3, seed=13)
    write_memory(str(tmp_path / "mem"), x, labels, [f"m{i}" for i in range(100)], class_names=["a", "b", "c"])
    res = _run(tmp_path, "add", str(tmp_path / "mem"), str(tmp_path / "dim8.parquet"))
    assert res.returncode == 2
    assert _lines(res.stderr) == [f"vismem add: error: the embedding shards at {tmp_path / 'dim8.parquet'} hold 8-d "
                                  "embeddings, none of dimension 16"], res.stderr
    res = _run(tmp_path, "add", str(tmp_path / "mem"), str(tmp_path / "varlen.parquet"))
    assert res.returncode == 2 and len(_lines(res.stderr)) == 1 and "column 'embedding'" in res.stderr


def test_rows_rejected_in_the_job_are_one_line_with_their_reason_and_the_log(tmp_path):
    _bad_inputs(tmp_path)
    out = tmp_path / "m"
    res = _run(tmp_path, "build", str(tmp_path / "dup.parquet"), str(out), "--num-shards", "1", "--class-names",
               "a,b,c")
    assert res.returncode == 2
    err = _lines(res.stderr)
    assert len(err) <= 4 and not [line for line in err if ENGINE.search(line)], res.stderr
    assert re.match(r"vismem build: error: build failed, nothing was published: no valid rows to publish: 50 rows "
                    r"rejected: duplicate id \(50\); see .*/deadletter/v00000001\.\w+\.parquet \(log: .*\.log\)$",
                    err[-1]), err
    log = _log_of(err[-1])
    assert log.startswith(str(out / "logs")) and "Traceback" in open(log).read()  # the workers' tracebacks


def test_an_output_path_that_is_a_file_is_one_line(tmp_path, shards):
    _bad_inputs(tmp_path)
    res = _run(tmp_path, "build", str(shards), str(tmp_path / "afile"), "--num-shards", "1", "--class-names", "a")
    assert res.returncode == 2
    assert _lines(res.stderr) == [f"vismem build: error: the memory folder {tmp_path / 'afile'} is a file; name a "
                                  "folder (it is created if missing)"]


def test_rejected_rows_of_a_good_build_are_one_warning_line(tmp_path, shards):
    x, labels = clustered(20, 16, 3, seed=14)
    labels[:3] = 7  # outside the 3 classes
    schema.write_embeddings(str(tmp_path / "labels.parquet"),
                            schema.embedding_table([f"l{i}" for i in range(20)], x, labels))
    res = _run(tmp_path, "build", str(tmp_path / "labels.parquet"), str(tmp_path / "m"), "--num-shards", "1",
               "--class-names", "a,b,c", "--backend", "exact")
    assert res.returncode == 0, res.stderr
    warnings = [line for line in _lines(res.stderr) if "warning" in line]
    assert warnings == [f"vismem build: warning: 3 rows rejected: label 7 outside the 3 class names (3); see "
                        f"{json.loads(res.stdout)['dead_letter']['path']}"], res.stderr


# --- the pure parts -------------------------------------------------------------------------------------------
def test_schema_problems_name_each_column_and_what_it_must_be():
    assert schema.schema_problems(schema.embedding_schema(8)) == []
    bad = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32())), ("confidence", pa.string())])
    assert schema.schema_problems(bad) == [
        ("id", "is int64, must be string"),
        ("embedding", "is list<item: float>, must be a fixed-size list of float32 or float16 (one length for every "
                      "row)"),
        ("label", "missing: not an embedding shard (columns: id, embedding, confidence)"),
        ("confidence", "is string, must be float32"),
    ]


def test_bad_inputs_list_at_most_ten_problems_and_count_the_rest():
    err = BadInputs([(f"f{i}.parquet", "label" if i % 2 else None, "why") for i in range(13)])
    lines = str(err).splitlines()
    assert len(lines) == MAX_PROBLEM_LINES + 1 and lines[0] == "f0.parquet: why"
    assert lines[1] == "f1.parquet: column 'label' why" and lines[-1].startswith("... and 3 more problems")


class _Recorder:
    def __init__(self):
        self.events = []

    def stage(self, name, total=None, unit="items", rate=True):
        rec = self

        class Bar:
            n = 0

            def update(self, n):
                self.n += n
                rec.events.append((name, "update", n))

            def close(self):
                rec.events.append((name, "close", self.n))
        rec.events.append((name, "open", total))
        return Bar()


def test_marker_watch_draws_stages_in_order_from_the_markers(tmp_path):
    folder = str(tmp_path / "progress")
    rec = _Recorder()
    stages = [("read", "read", 2, 30, "rows"), ("write", "write", None, 30, "items")]
    with MarkerWatch(rec, folder, stages, interval=3600) as watch:  # polled by hand here
        mark(folder, "read", "a.parquet", 10)
        watch.poll()
        mark(folder, "read", "a.parquet", 10)  # a retried file is counted once
        mark(folder, "read", "b.parquet", 20)
        mark(folder, "write", "shard-0", 25)
        watch.poll()
        assert {stage: sorted(units.values()) for stage, units in read_marks(folder).items()} == {
            "read": [10, 20], "write": [25]}
        watch.finish({"write": 28})
    assert rec.events == [("read", "open", 30), ("read", "update", 10), ("read", "update", 20), ("read", "close", 30),
                          ("write", "open", 30), ("write", "update", 25), ("write", "update", 3),
                          ("write", "close", 28)]


def test_the_demo_shows_one_line_per_stage_and_its_report(tmp_path):
    """``vismem demo`` (a small run): its stages and the report's path on stderr, nothing of the engines,
    and stdout only its JSON summary (the encoder library's own "Loaded pretrained weights" print included)."""
    out = tmp_path / "demo"
    res = _run(tmp_path, "demo", "--out", str(out), "--train", "600", "--test", "200", "--compare-encoders", "",
               "--k-max", "50")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    err = _lines(res.stderr)
    assert [line.split(":")[0] for line in err] == ["embed (Ray)", "build (Beam)", "evaluate", "experiments",
                                                    "report", "vismem demo"], res.stderr
    assert not [line for line in err if ENGINE.search(line)]
    assert f"report: {summary['report']}" in err
    assert os.path.exists(summary["report"]) and os.path.exists(_log_of(res.stderr))


def test_prune_shows_its_stages_and_logs_to_the_memory_folder(tmp_path):
    """Soft pruning of a 2-shard memory: one line per stage (self-queries, reweighting), the summary
    last, the Beam logs in MEMORY/logs/, and no progress markers left behind."""
    out = tmp_path / "m"
    x, labels = clustered(600, 16, 3, seed=12, noise=0.7)
    labels = labels.copy()
    labels[::10] = (labels[::10] + 1) % 3  # mislabelled items: some weights change
    write_memory(str(out), x, labels, [f"i{i:04d}" for i in range(600)], num_shards=2, class_names=["a", "b", "c"])
    res = _run(tmp_path, "prune", str(out), "--self-k", "5", "--soft", "--direct_num_workers", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["version"] == 2
    err = _lines(res.stderr)
    assert len(err) <= 8 and not [line for line in err if ENGINE.search(line)], res.stderr  # Beam's import too
    assert err[0].startswith(f"{out} version 1: 600 live items in 2 shards, self-k 5"), err
    assert any(line.startswith("self-queries: 600 items in") for line in err), err
    assert any(line.startswith("reweight shards: 600 items in") for line in err), err
    assert err[-1].startswith(f"vismem prune: pruned {out} to version 2: vote weights"), err
    log = _log_of(err[-1])
    assert os.path.dirname(log) == str(out / "logs") and "vismem.prune: pruning" in open(log).read()
    assert not list(out.rglob("progress")) and not list(out.rglob("staging"))
