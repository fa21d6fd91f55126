"""``vismem eval`` streamed on Ray Data: the in-process evaluation's report, to the last digit, from per-batch counts.

Oracle: ``eval.evaluate.evaluate`` (``--in-process``), which holds every query's neighbours at once.
Every figure in ``metrics.jsonl`` must be equal (only the timing row differs), ``report.md`` too but
for its timing line, and the plots byte for byte. Cases: the demo's kind of data (several shards,
unlabelled rows among the queries, soft vote weights, out-of-distribution queries, Ray-hosted shards),
a routed k-means memory, 100k queries, ``gs://`` queries, a run SIGKILLed mid-way and resumed, and
the errors at the door.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray

from conftest import clustered, kill_tree
from eval.evaluate import evaluate
from eval.streamed import evaluate_streamed
from memory import schema, storage, write_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def local_ray(gcs_emulator):
    # The emulator's address is in the environment before Ray starts, so the workers read gs:// too.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def figures(out) -> list:
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["figure"] != "timing"]


def report_lines(out) -> list:
    return [line for line in open(os.path.join(out, "report.md")) if not line.startswith("Retrieval ")]


def assert_same_report(streamed, in_process, summary=None, want=None):
    assert figures(streamed) == figures(in_process)
    assert report_lines(streamed) == report_lines(in_process)
    pngs = sorted(n for n in os.listdir(in_process) if n.endswith(".png"))
    assert len(pngs) == 8
    for name in pngs:  # drawn from the same numbers: the same bytes
        with open(os.path.join(streamed, name), "rb") as a, open(os.path.join(in_process, name), "rb") as b:
            assert a.read() == b.read(), name
    if summary is not None:
        for key in ("best_k_on_eval_set", "held_out_choice", "confidence", "ties"):
            assert summary[key] == want[key], key


def _demo_like(tmp_path, n_memory=2000, n_queries=1000, seed=31):
    """A memory of 3 shards with soft-pruned items, and queries in two shards with unlabelled rows among them."""
    x, labels = clustered(n_memory + n_queries, 16, 6, seed=seed, noise=0.9)  # overlapping: every figure moves
    weights = np.where(np.arange(n_memory) % 9 == 0, 0.4, 1.0)
    mem = str(tmp_path / "m")
    write_memory(mem, x[:n_memory], labels[:n_memory], [f"m{i}" for i in range(n_memory)], num_shards=3,
                 class_names=[f"c{i}" for i in range(6)], weights=weights)
    q = labels[n_memory:].copy()
    q[::7] = -1  # unlabelled rows: read, never scored
    half = n_queries * 3 // 5
    os.makedirs(tmp_path / "q")
    schema.write_embeddings(str(tmp_path / "q" / "a.parquet"), schema.embedding_table(
        [f"q{i}" for i in range(half)], x[n_memory:n_memory + half], q[:half]))
    schema.write_embeddings(str(tmp_path / "q" / "b.parquet"), schema.embedding_table(
        [f"q{i}" for i in range(half, n_queries)], x[n_memory + half:], q[half:]))
    ood, _ = clustered(70, 16, 3, seed=99)
    schema.write_embeddings(str(tmp_path / "ood.parquet"),
                            schema.embedding_table([f"o{i}" for i in range(70)], ood, [-1] * 70))
    return mem, str(tmp_path / "q"), str(tmp_path / "ood.parquet")


def test_streamed_report_equals_the_in_process_one(tmp_path, local_ray):
    mem, queries, ood = _demo_like(tmp_path)
    kw = dict(k_max=40, ood_queries_path=ood, batch_size=128, seed=2)
    want = evaluate(mem, queries, str(tmp_path / "in"), **kw)
    got = evaluate_streamed(mem, queries, str(tmp_path / "st"), progress=False, **kw)
    # 600 rows in 5 batches, 400 in 4, 70 out-of-distribution in 1; 857 labelled queries.
    assert got["batches"] == {"planned": 10, "reused": 0, "computed": 10} and got["timing"]["queries"] == 857
    assert got["timing"]["workers"] == 2
    assert_same_report(str(tmp_path / "st"), str(tmp_path / "in"), got, want)
    # Ray-hosted shards, called by the workers: the same report again.
    hosted = evaluate_streamed(mem, queries, str(tmp_path / "hosted"), ray_address="local", progress=False, **kw)
    assert_same_report(str(tmp_path / "hosted"), str(tmp_path / "in"), hosted, want)
    # Done is done: a rerun reuses every batch and writes the same report.
    again = evaluate_streamed(mem, queries, str(tmp_path / "st"), progress=False, **kw)
    assert again["batches"] == {"planned": 10, "reused": 10, "computed": 0}
    assert_same_report(str(tmp_path / "st"), str(tmp_path / "in"))


def test_routed_streamed_eval_equals_in_process(tmp_path, local_ray, monkeypatch):
    """A k-means memory searched with probe_shards=1, the released code's tie rule, paths relative to the
    working directory (the workers get them whole; the report names them as given)."""
    from pipelines.build import build_memory

    x, labels = clustered(1900, 16, 12, seed=21, noise=0.6)
    schema.write_embeddings(str(tmp_path / "m.parquet"),
                            schema.embedding_table([f"m{i}" for i in range(1500)], x[:1500], labels[:1500] % 4))
    queries = str(tmp_path / "q.parquet")
    schema.write_embeddings(queries, schema.embedding_table([f"q{i}" for i in range(400)], x[1500:], labels[1500:] % 4))
    mem = str(tmp_path / "mem")
    build_memory(str(tmp_path / "m.parquet"), mem, num_shards=4, class_names=list("abcd"), partition="kmeans",
                 kmeans_cells=16, backend="exact", pipeline_args=["--direct_running_mode=in_memory"])
    kw = dict(k_max=20, batch_size=100, probe_shards=1, ties="leader")
    monkeypatch.chdir(tmp_path)
    want = evaluate("mem", "q.parquet", "in", **kw)
    got = evaluate_streamed("mem", "q.parquet", "st", progress=False, **kw)
    assert_same_report("st", "in", got, want)
    assert got["report"] == os.path.join("st", "report.md")
    report = open(got["report"]).read()
    assert "searched only its 1 nearest shards" in report and "Memory `mem` (version 1); queries `q.parquet`" in report
    # With a probe margin: both engines alike, and the report says so.
    kw = dict(k_max=20, batch_size=100, probe_shards=3, probe_margin=0.05, ties="leader")
    want = evaluate("mem", "q.parquet", "in-margin", **kw)
    got = evaluate_streamed("mem", "q.parquet", "st-margin", progress=False, **kw)
    assert_same_report("st-margin", "in-margin", got, want)
    assert "within similarity 0.05 of the nearest (probe margin)" in open(got["report"]).read()


def test_filtered_eval_streamed_equals_in_process_and_a_memory_of_the_allowed_items(tmp_path, local_ray):
    """``--include label_source=human``: only human-labelled items vote, in both engines alike; the
    votes equal those of a memory built from the human-labelled items alone."""
    from memory.filters import ItemFilter

    x, labels = clustered(1500, 16, 5, seed=41, noise=0.8)
    n = 1200
    human = np.arange(n) % 3 == 0
    prov = {"label_source": np.where(human, "human", "teacher").astype(object)}
    ids = np.array([f"m{i}" for i in range(n)], dtype=object)
    names = [f"c{i}" for i in range(5)]
    write_memory(str(tmp_path / "m"), x[:n], labels[:n], ids, num_shards=3, class_names=names, provenance=prov)
    write_memory(str(tmp_path / "h"), x[:n][human], labels[:n][human], ids[human], num_shards=2, class_names=names)
    queries = str(tmp_path / "q.parquet")
    schema.write_embeddings(queries, schema.embedding_table([f"q{i}" for i in range(300)], x[n:], labels[n:]))
    kw = dict(k_max=30, batch_size=64, where=ItemFilter.of(include={"label_source": "human"}))
    want = evaluate(str(tmp_path / "m"), queries, str(tmp_path / "in"), **kw)
    got = evaluate_streamed(str(tmp_path / "m"), queries, str(tmp_path / "st"), progress=False, **kw)
    assert_same_report(str(tmp_path / "st"), str(tmp_path / "in"), got, want)
    assert "only items with label_source in {human} vote" in open(got["report"]).read()
    alone = evaluate(str(tmp_path / "h"), queries, str(tmp_path / "alone"), k_max=30, batch_size=64)
    accuracy = [(r["method"], r["k"], r["accuracy"]) for r in figures(str(tmp_path / "in"))
                if r["figure"] == "accuracy_by_k" and r["method"] in ("plurality", "rank")]
    assert accuracy and accuracy == [(r["method"], r["k"], r["accuracy"]) for r in figures(str(tmp_path / "alone"))
                                     if r["figure"] == "accuracy_by_k" and r["method"] in ("plurality", "rank")]


def test_100k_queries_streamed_equal_in_process(tmp_path, local_ray):
    """100,000 queries (8-d, 25 batches of 4,096) against 3,000 items: the same report, and the streamed
    job's workers never hold more than a batch of neighbour lists."""
    rng = np.random.default_rng(41)
    x, labels = clustered(103_000, 8, 10, seed=41, noise=1.2)
    mem = str(tmp_path / "m")
    write_memory(mem, x[:3000], labels[:3000], [f"m{i}" for i in range(3000)], num_shards=2,
                 class_names=[str(i) for i in range(10)])
    q = labels[3000:].copy()
    q[rng.random(len(q)) < 0.02] = -1
    queries = str(tmp_path / "q.parquet")
    schema.write_embeddings(queries, schema.embedding_table([f"q{i:06d}" for i in range(100_000)], x[3000:], q))
    kw = dict(k_max=10, batch_size=4096)
    t0 = time.perf_counter()
    want = evaluate(mem, queries, str(tmp_path / "in"), **kw)
    t1 = time.perf_counter()
    got = evaluate_streamed(mem, queries, str(tmp_path / "st"), progress=False, **kw)
    t2 = time.perf_counter()
    assert got["batches"]["planned"] == 25 and got["timing"]["queries"] == int((q >= 0).sum())
    assert_same_report(str(tmp_path / "st"), str(tmp_path / "in"), got, want)
    print(f"100k queries: in-process {t1 - t0:.1f} s, streamed {t2 - t1:.1f} s")


def test_gs_query_shards_stream_from_cloud_storage(tmp_path, gcs_path, local_ray):
    mem, queries, ood = _demo_like(tmp_path, n_queries=500, seed=5)
    remote = f"{gcs_path}/queries"
    for name in sorted(os.listdir(queries)):
        storage.write_bytes_atomic(f"{remote}/{name}", open(os.path.join(queries, name), "rb").read())
    kw = dict(k_max=25, batch_size=64)
    want = evaluate(mem, queries, str(tmp_path / "in"), **kw)
    got = evaluate_streamed(mem, remote, str(tmp_path / "st"), progress=False, **kw)
    assert got["batches"]["planned"] == 9  # 300 rows in 5 batches of 64, 200 in 4
    assert figures(str(tmp_path / "st")) == figures(str(tmp_path / "in"))
    assert f"queries `{remote}`" in open(got["report"]).read()


def test_bad_input_is_refused_at_the_door_in_one_line(tmp_path, capsys):
    from cli.main import main

    x, labels = clustered(100, 8, 2, seed=5)
    mem = str(tmp_path / "m")
    write_memory(mem, x, labels, [f"m{i}" for i in range(100)], class_names=["a", "b"])
    unlabelled = str(tmp_path / "unlabelled.parquet")
    schema.write_embeddings(unlabelled, schema.embedding_table([f"q{i}" for i in range(30)], x[:30], [-1] * 30))
    assert main(["eval", mem, unlabelled, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"vismem eval: error: {unlabelled} has no labelled rows (label >= 0): nothing to evaluate against "
                   "(every label is -1)")
    assert not (tmp_path / "o").exists()  # refused before any work
    labelled = str(tmp_path / "q.parquet")
    schema.write_embeddings(labelled, schema.embedding_table([f"q{i}" for i in range(30)], x[:30], labels[:30] + 1))
    with pytest.raises(ValueError, match="labels reach 2, but memory .* has 2 classes"):
        evaluate_streamed(mem, labelled, str(tmp_path / "o"))
    schema.write_embeddings(labelled, schema.embedding_table([f"q{i}" for i in range(30)], x[:30], labels[:30]))
    with pytest.raises(ValueError, match="probe_shards needs a k-means partitioned memory"):
        evaluate_streamed(mem, labelled, str(tmp_path / "o"), probe_shards=1)
    with pytest.raises(ValueError, match="probe_margin needs a k-means partitioned memory"):
        evaluate_streamed(mem, labelled, str(tmp_path / "o"), probe_margin=0.1)
    with pytest.raises(ValueError, match="probe_margin must be a finite number >= 0"):
        evaluate_streamed(mem, labelled, str(tmp_path / "o"), probe_margin=-0.1)
    # Batches of another evaluation in the same folder are never mixed in: the difference is named.
    from eval.batch_store import BatchStore
    BatchStore(str(tmp_path / "o")).claim({"k_max": 5})
    with pytest.raises(ValueError, match=r"holds the batches of another evaluation \(it differs in .*k_max"):
        evaluate_streamed(mem, labelled, str(tmp_path / "o"), k_max=7)


def test_a_killed_evaluation_resumes_from_its_finished_batches(tmp_path, local_ray):
    """A real SIGKILL of ``vismem eval`` (driver, Ray and workers) once some batches are written; the rerun
    reuses exactly those, computes the rest and writes the report of an uninterrupted run."""
    mem, queries, _ = _demo_like(tmp_path, n_memory=1500, n_queries=3000, seed=12)
    out = tmp_path / "killed"
    batches = out / "batches"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "eval", mem, queries, "--out", str(out), "--k-max", "30",
                             "--batch-size", "20", "--workers", "1", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def finished():
        return [n for n in os.listdir(batches) if n.endswith(".stats.npz")] if batches.exists() else []

    try:
        deadline = time.time() + 240
        while len(finished()) < 5:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no batch was finished in time"
            time.sleep(0.02)
    finally:
        kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    done = finished()
    assert 5 <= len(done) < 150 and not (out / "metrics.jsonl").exists()  # killed mid-way: 150 batches planned
    print(f"killed after {len(done)} of 150 batches")
    got = evaluate_streamed(mem, queries, str(out), k_max=30, batch_size=20, progress=False)
    assert got["batches"] == {"planned": 150, "reused": len(done), "computed": 150 - len(done)}
    want = evaluate(mem, queries, str(tmp_path / "in"), k_max=30, batch_size=20)
    assert_same_report(str(out), str(tmp_path / "in"), got, want)
