"""Filters through every surface that searches: `vismem query` and the HTTP API, against the library."""
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import clustered
from deploy.serving import create_app
from memory import Memory, schema, write_memory
from memory.filters import ItemFilter
from test_serve import Running

VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")
CLASSES = ["x", "y", "z"]


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    x, labels = clustered(900, 12, 3, seed=31, noise=0.4)
    n = 800
    prov = {"label_source": np.where(np.arange(n) % 4 == 0, "human", "teacher").astype(object),
            "source": np.where(np.arange(n) % 3 == 0, "web", "lab").astype(object)}
    ids = np.array([f"m{i:04d}" for i in range(n)], dtype=object)
    write_memory(str(root / "m"), x[:n], labels[:n], ids, num_shards=2, class_names=CLASSES, provenance=prov)
    schema.write_embeddings(str(root / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(100)], x[n:], labels[n:]))
    human = set(ids[prov["label_source"] == "human"])
    web = set(ids[prov["source"] == "web"])
    return root, x[n:], human, web


def test_vismem_query_filters_inside_the_shards(memory):
    root, q, human, web = memory
    out = root / "human.parquet"
    res = subprocess.run([VISMEM, "query", str(root / "m"), str(root / "q.parquet"), "--k", "9",
                          "--include", "label_source=human", "--exclude", "source=web", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["filter"] == {"include": {"label_source": ["human"]}, "exclude": {"source": ["web"]}}
    table = pq.read_table(out).to_pydict()
    allowed = human - web
    assert all(len(row) == 9 and set(row) <= allowed for row in table["neighbour_ids"])
    where = ItemFilter.parse(["label_source=human"], ["source=web"])
    with Memory.open(str(root / "m")) as mem:
        want = mem.classify(q, 9, "rank", where=where)
    assert table["prediction"] == want.predictions.tolist()
    assert [list(r) for r in table["neighbour_ids"]] == want.neighbours.ids.tolist()

    bad = subprocess.run([VISMEM, "query", str(root / "m"), str(root / "q.parquet"), "--include", "uri=x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "vismem query: error: cannot filter on 'uri' (include); filter fields are: label_source, source"]


def test_http_classify_and_neighbours_filter_like_the_library(memory):
    root, q, human, web = memory
    where = ItemFilter.of(include={"label_source": ["human"]})
    with Memory.open(str(root / "m")) as mem:
        want = mem.classify(q[:8], 5, "rank", where=where)
        plain = mem.search(q[:8], 5)
    assert not np.isin(plain.ids, list(human)).all()  # the filter has something to do
    with Running(create_app(str(root / "m"))) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        body = {"embeddings": q[:8].tolist(), "k": 5, "include": {"label_source": ["human"]}}
        res = c.post("/v1/classify", json=body)
        assert res.status_code == 200, res.text
        results = res.json()["results"]
        assert [r["label_index"] for r in results] == want.predictions.tolist()
        assert [[n["id"] for n in r["neighbours"]] for r in results] == want.neighbours.ids.tolist()
        nb = c.post("/v1/neighbors", json={"embeddings": q[:8].tolist(), "k": 5, "exclude": {"source": ["web"]}})
        assert nb.status_code == 200 and all(n["id"] not in web for row in nb.json()["neighbours"] for n in row)
        bad = c.post("/v1/neighbors", json={"embeddings": q[:2].tolist(), "include": {"label_source": ["robot"]}})
        assert bad.status_code == 422 and "Input should be 'human' or 'teacher'" in bad.text
        unknown = c.post("/v1/neighbors", json={"embeddings": q[:2].tolist(), "include": {"uri": ["a"]}})
        assert unknown.status_code == 422


def test_the_demo_reports_one_memory_with_and_without_its_pseudo_labels(memory):
    from demo.experiments import label_sources
    from eval.experiments.common import Split

    root, q, human, web = memory
    labels = np.asarray(schema.read_embeddings(str(root / "q.parquet"))["labels"])
    part = label_sources(str(root / "m"), Split(q, labels, np.arange(len(q))), k=9)
    with Memory.open(str(root / "m")) as mem:
        only = mem.classify(q, 9, "rank", where=ItemFilter.of(include={"label_source": "human"}))
        every = mem.classify(q, 9, "rank")
    acc = part["figures"]["accuracy"]
    assert acc["human labels only"] == float((only.predictions == labels).mean())
    assert acc["human + pseudo-labels"] == float((every.predictions == labels).mean())
    assert "| human labels only |" in part["report"]
