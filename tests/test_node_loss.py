"""Node loss on a real two-node Ray cluster (``ray start --head`` + ``ray start --address`` on loopback):
the worker node is SIGKILLed, whole, in the middle of an embedding run and of an evaluation with Ray-hosted shards.

The embedding run must finish with every row exactly once; the evaluation must finish with the
figures of a single-process run or fail with an error that says a shard was lost — never a wrong answer.
The head has one CPU so that the work cannot all fit on it: some of it must run on the worker node.
"""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import clustered
from ray_head import Cluster


@pytest.fixture(scope="module")
def cluster():
    with Cluster(head_cpus=1) as c:
        yield c


def _wait_until(condition, proc, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the command ended before {what}: {proc.stderr.read().decode()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_embedding_survives_losing_a_worker_node_with_every_row_exactly_once(tmp_path, cluster):
    from pipelines.encoders import load_encoder
    from pipelines.outputs import read_run
    from pipelines.sources import fashion_mnist

    worker = cluster.add_node(cpus=2, resources={"worker_node": 1})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "embed", "fashion-mnist", str(out), "--split", "test", "--limit", "160",
         "--shard-size", "10", "--image-size", "32", "--batch-size", "10", "--num-workers", "2",
         "--threads-per-worker", "1", "--ray-address", cluster.address, "--no-progress"],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def started():  # a shard is out, and an encoder actor is on the worker node (the head holds one at most)
            d = out / "embeddings"
            return d.exists() and any(n.endswith(".parquet") for n in os.listdir(d)) and worker.runs("EncoderWorker")

        _wait_until(started, proc, "the first shard with an encoder on the worker node")
        worker.kill()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout)
    assert summary["ray"]["actors_lost"] >= 1  # the worker node's actor was lost and its shard redone elsewhere
    assert summary["counts"]["embedded"] == summary["counts"]["read"] == 160
    run = read_run(str(out))
    assert len(run["ids"]) == len(set(run["ids"])) == 160  # every row exactly once
    x, y = fashion_mnist("test")
    np.testing.assert_array_equal(run["labels"], y[:160])
    np.testing.assert_allclose(run["embeddings"], load_encoder("efficientnet-lite0", 32).embed(x[:160]), atol=1e-4)
    assert not [n for n in os.listdir(out / "embeddings") if ".tmp-" in n]


def _figures(out_dir):
    return [r for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if r["figure"] != "timing"]


def test_evaluation_losing_a_worker_node_gives_the_same_figures_or_a_clear_error(tmp_path, cluster):
    from eval.evaluate import evaluate
    from memory import schema, write_memory

    x, labels = clustered(3500, 16, 4, seed=71, noise=0.8)
    mem = str(tmp_path / "m")
    write_memory(mem, x[:1000], labels[:1000], [f"e{i}" for i in range(1000)], num_shards=3, class_names=list("abcd"))
    queries = str(tmp_path / "q.parquet")
    schema.write_embeddings(queries, schema.embedding_table([f"q{i}" for i in range(2500)], x[1000:], labels[1000:]))
    evaluate(mem, queries, str(tmp_path / "local"), k_max=30, batch_size=5)  # the single-process figures

    worker = cluster.add_node(cpus=2, resources={"worker_node": 1})
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "eval", mem, queries, "--out", str(tmp_path / "ray"), "--k-max", "30",
         "--batch-size", "5", "--ray-address", cluster.address],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Kill while a shard host on the worker node is answering a search (Ray titles it ray::ShardHost.search).
        _wait_until(lambda: worker.runs("ShardHost.search"), proc, "a search on the worker node")
        worker.kill()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:
        assert _figures(tmp_path / "ray") == _figures(tmp_path / "local")
    else:  # Ray's words for a call in flight on a lost node ("unavailable") or after it ("died"), or vismem's
        assert re.search(r"lost|died|unavailable", stderr.decode()[-2000:]), stderr.decode()[-3000:]
        assert not (tmp_path / "ray" / "metrics.jsonl").exists()  # no figures from a partial retrieval


POOL_DRIVER = r"""
import json, os, sys
import ray
from pipelines.embed_pool import EmbedPool

ray.init(address=sys.argv[1], log_to_driver=False)


@ray.remote(num_cpus=0)
class Toy:
    def __init__(self, marks):
        self.marks = marks

    def ready(self):
        return os.getpid()

    def work(self, item):
        mark = os.path.join(self.marks, item)
        if item == "poison" or (item == "dies-once" and not os.path.exists(mark)):
            open(mark, "w").close()
            os._exit(1)  # the actor's process dies mid-call, as on a lost node
        return item


def run(items):
    pool = EmbedPool(lambda: Toy.remote(sys.argv[2]), 2)
    pool.wait_ready()
    try:
        return {"done": sorted(pool.run(items, lambda a, i: a.work.remote(i), lambda up: None, lambda: None)),
                "lost": pool.lost}
    except RuntimeError as exc:
        return {"error": str(exc), "lost": pool.lost}


print("RESULT", json.dumps([run(["a", "dies-once", "b", "c"]), run(["poison", "d"])]), flush=True)
os._exit(0)  # as the console script does (cli.exits): native teardown can abort after the result is out
"""


def test_the_pool_redoes_a_lost_actors_item_and_gives_up_on_an_item_that_kills_every_actor(tmp_path, cluster):
    res = subprocess.run([sys.executable, "-c", POOL_DRIVER, cluster.address, str(tmp_path)], env=cluster.env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]  # Ray prints events too
    once, poison = json.loads(result[0][len("RESULT "):])
    assert once == {"done": ["a", "b", "c", "dies-once"], "lost": 1}
    assert poison["error"].startswith("poison lost its encoder actor 3 times") and poison["lost"] == 3
