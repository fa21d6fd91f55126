"""A real ``vismem embed`` job on a real Ray head: its encoder actors run on the cluster, not in the driver."""
import os

import numpy as np
import pytest

from cli.main import build_parser
from deploy import submit
from memory import schema
from ray_head import ray_head


@pytest.fixture(scope="module")
def head():
    with ray_head() as url:
        yield url


def test_embed_job_runs_on_the_cluster(head, tmp_path):
    out = tmp_path / "emb"
    with open(tmp_path / "logs.txt", "w") as logs:
        rec = submit.submit(head, ["vismem", "embed", "fashion-mnist", str(out), "--limit", "24", "--shard-size", "12",
                                   "--image-size", "32", "--num-workers", "1", "--threads-per-worker", "1",
                                   "--ray-address", "auto", "--no-progress"],
                            parse=build_parser().parse_args, runtime=submit.runtime_env(working_dir=None), out=logs)
    assert rec["status"] == "SUCCEEDED", (tmp_path / "logs.txt").read_text()[-3000:]
    shards = sorted((out / "embeddings").glob("*.parquet"))
    assert len(shards) == 2
    data = schema.read_embeddings(str(shards[0]))
    assert data["embeddings"].shape == (12, 1280)
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-3)
    assert set(data["labels"]) <= set(range(10)) and os.path.exists(out / "summary.json")
