"""Shards hosted in Ray actors on a real local Ray instance give the in-process results exactly."""
import numpy as np
import pytest
import ray

from conftest import clustered
from memory import Memory, write_memory


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_hosted_shards_equal_in_process(tmp_path, local_ray):
    x, labels = clustered(3000, 16, 5, seed=61)
    ids = [f"r{i:05d}" for i in range(3000)]
    path = str(tmp_path / "m")
    write_memory(path, x, labels, ids, num_shards=3, class_names=list("abcde"))
    q, _ = clustered(100, 16, 5, seed=62)
    with Memory.open(path) as local:
        want = local.classify(q, 20, "rank")
    with Memory.open(path, hosts="ray") as remote:
        assert len(remote) == 3000
        got = remote.classify(q, 20, "rank")
    np.testing.assert_array_equal(got.neighbours.ids, want.neighbours.ids)
    np.testing.assert_array_equal(got.neighbours.sims, want.neighbours.sims)
    np.testing.assert_array_equal(got.predictions, want.predictions)


def test_ray_hosted_corrupt_shard_fails_by_name(tmp_path, local_ray):
    import os

    from memory import manifest as mf

    x, labels = clustered(200, 8, 2, seed=63)
    path = str(tmp_path / "m")
    write_memory(path, x, labels, [f"i{i}" for i in range(200)], num_shards=2, class_names=["a", "b"])
    entry = mf.read_manifest(path).shards[0]
    with open(os.path.join(path, entry.path, "items.parquet"), "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff\xff")
    with pytest.raises(Exception, match="corrupt: items.parquet"):
        Memory.open(path, hosts="ray")
    with pytest.raises(ValueError, match="hosts must be 'local' or 'ray'"):
        Memory.open(path, hosts="k8s")


def test_eval_with_ray_hosted_shards_equals_in_process(tmp_path, local_ray):
    import json

    from eval.evaluate import evaluate
    from memory import schema

    x, labels = clustered(1200, 16, 4, seed=64, noise=0.8)
    path = str(tmp_path / "m")
    write_memory(path, x[:1000], labels[:1000], [f"e{i}" for i in range(1000)], num_shards=3,
                 class_names=list("abcd"))
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(200)], x[1000:], labels[1000:]))

    def figures(out, **kw):
        evaluate(path, str(tmp_path / "q.parquet"), str(tmp_path / out), k_max=30, **kw)
        return [r for r in map(json.loads, open(tmp_path / out / "metrics.jsonl")) if r["figure"] != "timing"]

    assert figures("ray", ray_address="local") == figures("local")
