"""The ``vismem`` console script, run as a user runs it."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import clustered
from memory import schema, write_memory

VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")


def _run(*args):
    return subprocess.run([VISMEM, *args], capture_output=True, text=True, timeout=300)


def test_query_writes_predictions_with_neighbours(tmp_path):
    x, labels = clustered(500, 12, 3, seed=21, noise=0.1)
    write_memory(str(tmp_path / "m"), x[:400], labels[:400], [f"m{i}" for i in range(400)],
                 num_shards=2, class_names=["x", "y", "z"])
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(100)], x[400:], labels[400:]))
    out = tmp_path / "preds.parquet"
    res = _run("query", str(tmp_path / "m"), str(tmp_path / "q.parquet"), "--k", "7", "--method", "rank",
               "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["queries"] == 100 and summary["top1_accuracy"] > 0.95
    table = pq.read_table(out).to_pydict()
    assert table["id"][:2] == ["q0", "q1"]
    assert all(len(n) == 7 for n in table["neighbour_ids"])
    assert np.mean(np.array(table["prediction"]) == labels[400:]) == summary["top1_accuracy"]
    assert set(table["prediction_name"]) <= {"x", "y", "z"}

    info = _run("info", str(tmp_path / "m"))
    assert info.returncode == 0 and json.loads(info.stdout)["count"] == 400


def test_query_writes_confidence_and_abstains_below_the_threshold(tmp_path):
    x, labels = clustered(500, 12, 3, seed=24, noise=0.9)  # overlapping clusters: split votes
    write_memory(str(tmp_path / "m"), x[:400], labels[:400], [f"m{i}" for i in range(400)],
                 num_shards=2, class_names=["x", "y", "z"])
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(100)], x[400:], labels[400:]))
    runs = {}
    for name, extra in (("all", []), ("sure", ["--abstain-below", "0.8"])):
        out = tmp_path / f"{name}.parquet"
        res = _run("query", str(tmp_path / "m"), str(tmp_path / "q.parquet"), "--k", "7", "--method", "plurality",
                   "--out", str(out), *extra)
        assert res.returncode == 0, res.stderr
        runs[name] = (json.loads(res.stdout), pq.read_table(out).to_pydict())
    summary, table = runs["all"]
    voted = np.array(table["prediction"])
    # Plurality at k = 7: the share is the voted class's count among the 7 neighbour labels, over 7.
    counts = np.array([row.count(p) for row, p in zip(table["neighbour_labels"], voted)])
    np.testing.assert_allclose(table["confidence"], counts / 7, rtol=1e-12)
    assert not any(table["abstained"]) and "abstained" not in summary
    assert summary["mean_confidence"] == pytest.approx(np.mean(counts / 7))
    sure_summary, sure = runs["sure"]
    unsure = counts / 7 < 0.8  # 5 of 7 votes or fewer
    assert 0 < unsure.sum() < 100, unsure.sum()
    assert sure["abstained"] == unsure.tolist() and sure["confidence"] == table["confidence"]
    assert sure["prediction"] == np.where(unsure, -1, voted).tolist()
    assert [n is None for n in sure["prediction_name"]] == unsure.tolist()
    assert sure_summary["abstained"] == int(unsure.sum()) and sure_summary["abstain_below"] == 0.8
    truth = labels[400:]
    assert sure_summary["top1_accuracy"] == float(np.mean(np.where(unsure, -1, voted) == truth))
    assert sure_summary["accuracy_answered"] == float(np.mean(voted[~unsure] == truth[~unsure]))


def test_errors_are_one_clear_line_and_a_nonzero_exit(tmp_path):
    res = _run("query", str(tmp_path / "missing"), str(tmp_path / "q.parquet"))
    assert res.returncode == 2
    assert "no memory at" in res.stderr and "Traceback" not in res.stderr  # the memory is checked first
    x, labels = clustered(50, 12, 3, seed=22)
    write_memory(str(tmp_path / "m"), x, labels, [f"m{i}" for i in range(50)], class_names=["x", "y", "z"])
    schema.write_embeddings(str(tmp_path / "q.parquet"), schema.embedding_table(["q"], x[:1, :6], [0]))
    res = _run("query", str(tmp_path / "m"), str(tmp_path / "q.parquet"))
    assert res.returncode == 2 and "shape (n, 12)" in res.stderr


def test_help_teaches():
    res = _run("query", "--help")
    assert res.returncode == 0 and "example: vismem query" in res.stdout and "rank" in res.stdout


def test_a_large_k_searches_in_smaller_batches_with_the_same_answers(tmp_path, monkeypatch):
    from memory import query

    x, labels = clustered(260, 12, 3, seed=23, noise=0.3)
    write_memory(str(tmp_path / "m"), x[:200], labels[:200], [f"m{i}" for i in range(200)], num_shards=2,
                 class_names=["x", "y", "z"])
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(60)], x[200:], labels[200:]))
    whole = query.query_memory(str(tmp_path / "m"), str(tmp_path / "q.parquet"), k=200, out=str(tmp_path / "a.pq"))
    calls = []
    monkeypatch.setattr(query, "SLOTS_PER_BATCH", 200 * 7)  # 7 queries per search at k = 200
    real = query.Memory.classify
    monkeypatch.setattr(query.Memory, "classify",
                        lambda self, q, *a, **kw: calls.append(len(q)) or real(self, q, *a, **kw))
    small = query.query_memory(str(tmp_path / "m"), str(tmp_path / "q.parquet"), k=200, out=str(tmp_path / "b.pq"))
    assert calls == [7] * 8 + [4]
    assert small["top1_accuracy"] == whole["top1_accuracy"]
    a, b = pq.read_table(tmp_path / "a.pq").to_pydict(), pq.read_table(tmp_path / "b.pq").to_pydict()
    assert a == b and all(len(n) == 200 for n in a["neighbour_ids"])


def test_an_add_run_again_after_it_published_changes_nothing_and_exits_0(tmp_path):
    # A killed `vismem add` may have published before it died; running it again must not fail.
    x, labels = clustered(300, 12, 3, seed=23)
    root = str(tmp_path / "m")
    write_memory(root, x[:200], labels[:200], [f"m{i}" for i in range(200)], num_shards=2, class_names=["x", "y", "z"])
    new = str(tmp_path / "new.parquet")
    schema.write_embeddings(new, schema.embedding_table(np.array([f"n{i}" for i in range(100)], dtype=object),
                                                        x[200:], labels[200:]))
    first = _run("add", root, new, "--runner=DirectRunner")
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["version"] == 2
    again = _run("add", root, new, "--runner=DirectRunner")
    assert again.returncode == 0, again.stderr[-2000:]
    out = json.loads(again.stdout)
    assert out["changed"] is False and out["version"] == 2 and out["items_added"] == 0 and out["items_total"] == 300
    assert out["dead_letter"]["count"] == 100 and "already in the memory" in out["note"]
    # Half new, half already there: an ordinary add of the new half.
    mixed = str(tmp_path / "mixed.parquet")
    ids = np.array([f"n{i}" for i in range(50)] + [f"o{i}" for i in range(50)], dtype=object)
    schema.write_embeddings(mixed, schema.embedding_table(ids, x[200:], labels[200:]))
    out = json.loads(_run("add", root, mixed, "--runner=DirectRunner").stdout)
    assert out["changed"] is True and out["version"] == 3 and out["items_added"] == 50
    # Rows that are bad for another reason still fail the add.
    bad = str(tmp_path / "bad.parquet")
    schema.write_embeddings(bad, schema.embedding_table(np.array(["n1", "n1"], dtype=object), x[:2], labels[:2]))
    refused = _run("add", root, bad, "--runner=DirectRunner")
    assert refused.returncode == 2 and "no valid rows" in refused.stderr
