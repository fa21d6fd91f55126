"""``vismem serve``: the FastAPI app on a real uvicorn server on 127.0.0.1, spoken to over real HTTP."""
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from conftest import clustered
from deploy.client import VismemClient, VismemError
from deploy.serving import Limits, create_app, read_admin_token
from memory import Memory, write_memory
from memory import manifest as mf
from memory.mutations import remove_items

CLASSES = ["ant", "bee", "cat"]
DIM = 16
TOKEN = "t0ken-for-tests-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


def make_memory(root, n=300, seed=5):
    x, labels = clustered(n, DIM, 3, seed=seed, noise=0.2)
    ids = [f"item-{i:04d}" for i in range(n)]
    write_memory(root, x, labels, ids, num_shards=2, class_names=CLASSES)
    return x, labels, np.array(ids, dtype=object)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serve") / "mem")
    x, labels, ids = make_memory(root)
    limits = Limits(max_body_bytes=200_000, max_batch=32, max_k=100)
    with Running(create_app(root, admin_token=TOKEN, poll_s=0.2, limits=limits)) as srv:
        srv.root, srv.x, srv.labels, srv.ids = root, x, labels, ids
        yield srv


def test_classify_and_neighbours_equal_the_memory_itself(served):
    q, _ = clustered(10, DIM, 3, seed=6, noise=0.2)
    with Memory.open(served.root) as mem:
        want = mem.classify(q, k=7, method="softmax")
        want_nb = mem.search(q, 5)
    with VismemClient(served.url) as c:
        res = c.classify(q, k=7, method="softmax")
        nb = c.neighbors(q, k=5)
        assert c.health()["status"] == "ok"
        info = c.info()
    assert res["version"] == nb["version"] == 1 and res["k"] == 7 and res["method"] == "softmax"
    assert [r["label_index"] for r in res["results"]] == want.predictions.tolist()
    assert [r["label"] for r in res["results"]] == want.predicted_names
    for i, r in enumerate(res["results"]):
        assert [n["id"] for n in r["neighbours"]] == want.neighbours.ids[i].tolist()
        np.testing.assert_allclose([r["scores"][c] for c in CLASSES], want.scores[i], rtol=1e-5)
        assert all(n["label_name"] == CLASSES[n["label"]] for n in r["neighbours"])
    assert [[n["id"] for n in row] for row in nb["neighbours"]] == want_nb.ids.tolist()
    np.testing.assert_allclose([[n["sim"] for n in row] for row in nb["neighbours"]], want_nb.sims, atol=1e-6)
    assert info["dim"] == DIM and info["classes"] == CLASSES and info["items"] == 300 and info["shards"] == 2
    assert info["admin_enabled"] is True and info["limits"]["max_batch"] == 32


def test_classify_answers_confidence_and_abstains_below_the_threshold(served):
    q = np.random.default_rng(8).standard_normal((12, DIM))  # between the clusters: split votes
    with Memory.open(served.root) as mem:
        want = mem.classify(q, k=7, method="plurality", ties="leader", abstain_below=0.8)
        voted = mem.classify(q, k=7, method="plurality", ties="leader")
    assert 0 < want.abstained.sum() < len(q)  # some answer, some abstain
    with VismemClient(served.url) as c:
        res = c.classify(q, k=7, method="plurality", ties="leader", abstain_below=0.8, neighbours=False)
        plain = c.classify(q, k=7, method="plurality", ties="leader", neighbours=False)
    assert res["ties"] == "leader"
    assert [r["label_index"] for r in res["results"]] == want.predictions.tolist()
    assert [r["abstained"] for r in res["results"]] == want.abstained.tolist()
    assert [r["confidence"] for r in res["results"]] == want.confidence.tolist()
    for r, p in zip(plain["results"], voted.predictions):
        # The share of 7 plurality votes, from the response's own scores.
        assert r["confidence"] == pytest.approx(r["scores"][CLASSES[p]] / 7) and not r["abstained"]
        assert r["confidence"] == pytest.approx(max(r["scores"].values()) / sum(r["scores"].values()))
    for r, p in zip(res["results"], plain["results"]):
        assert r["abstained"] == (p["confidence"] < 0.8)
        assert (r.get("label"), r["label_index"]) == ((None, -1) if r["abstained"] else (p["label"], p["label_index"]))
    row = [0.1] * DIM
    for bad, words in (({"abstain_below": 1.5}, "abstain_below: Input should be less than or equal to 1"),
                       ({"abstain_below": -0.1}, "abstain_below: Input should be greater than or equal to 0"),
                       ({"abstain_below": "0.5"}, "abstain_below"), ({"ties": "first"}, "ties")):
        r = _post(served.url, "/v1/classify", {"embeddings": [row], **bad})
        assert r.status_code == 422 and words in r.json()["error"], (bad, r.text)


def test_openapi_schema_is_published(served):
    schema = httpx.get(served.url + "/openapi.json").json()
    assert {"/v1/classify", "/v1/neighbors", "/v1/health", "/v1/info", "/v1/admin/items",
            "/v1/admin/remove"} <= set(schema["paths"])
    body = schema["components"]["schemas"]["ClassifyQuery"]["properties"]
    assert set(body["method"]["enum"]) == {"plurality", "distance", "softmax", "rank"}
    assert set(body["ties"]["enum"]) == {"nearest", "leader"}
    limits = body["abstain_below"]["anyOf"][0]
    assert (limits["minimum"], limits["maximum"]) == (0, 1)
    decision = schema["components"]["schemas"]["Decision"]
    assert {"confidence", "abstained"} <= set(decision["required"])


def _post(url, path, payload=None, content=None, headers=None):
    return httpx.post(url + path, json=payload, content=content, headers=headers, timeout=30)


def chunked(data: bytes, size: int = 8192):
    """A body without Content-Length (chunked transfer encoding)."""
    return (data[i:i + size] for i in range(0, len(data), size))


def test_bad_input_gets_a_4xx_that_names_the_problem(served):
    url = served.url
    row = [0.1] * DIM
    cases = [
        (_post(url, "/v1/classify", content=b'{"embeddings": [[0.1, ', headers={"content-type": "application/json"}),
         400, "malformed JSON"),
        (_post(url, "/v1/classify", content=("{\"embeddings\": [[NaN" + ", 0.1" * (DIM - 1) + "]]}").encode(),
               headers={"content-type": "application/json"}), 422, "NaN"),
        (_post(url, "/v1/classify", {"embeddings": [row[:5]]}), 422, "dimension is 16"),
        (_post(url, "/v1/classify", {"embeddings": [row], "k": 0}), 422, "k must be between 1 and 100"),
        (_post(url, "/v1/neighbors", {"embeddings": [row], "k": 101}), 422, "k must be between 1 and 100"),
        (_post(url, "/v1/classify", {"embeddings": [row] * 33}), 422, "limit of 32"),
        (_post(url, "/v1/classify", {"embeddings": [row] * 4000}), 413, "exceeds the limit of 200000 bytes"),
        (_post(url, "/v1/classify", content=chunked(b'{"embeddings": [' + b"[0.5]," * 60_000 + b"[0.5]]}"),
               headers={"content-type": "application/json"}), 413, "exceeds the limit of 200000 bytes"),
        (_post(url, "/v1/classify", {"embeddings": [[0.0] * DIM]}), 422, "zero vector"),
        (_post(url, "/v1/classify", {"embeddings": [row], "method": "vote"}), 422, "method"),
        (_post(url, "/v1/classify", {"embeddings": [row], "kk": 3}), 422, "kk"),
        (_post(url, "/v1/classify", {"embeddings": []}), 422, "empty"),
        (_post(url, "/v1/classify", {"embeddings": [row], "images": ["aGk="]}), 422, "exactly one"),
        (_post(url, "/v1/classify", {"images": ["aGk="]}), 422, "--encoder"),
        (_post(url, "/v1/classify", {"embeddings": [[10 ** 400] * DIM]}), 422, "valid number"),
        (_post(url, "/v1/neighbors", {"embeddings": [row], "probe_shards": 1}), 422,
         "probe_shards needs a k-means partitioned memory"),
        (_post(url, "/v1/classify", {"embeddings": [row], "probe_shards": 0}), 422, "probe_shards"),
    ]
    for res, status, words in cases:
        assert res.status_code == status, (words, res.status_code, res.text)
        assert words in res.json()["error"], (words, res.text)
    # Any finite non-zero vector has a direction, even beyond float32's range or below its smallest value.
    want = _post(url, "/v1/neighbors", {"embeddings": [row], "k": 5}).json()
    for scale in (1e39, 1e-60):
        got = _post(url, "/v1/neighbors", {"embeddings": [[v * scale for v in row]], "k": 5})
        assert got.status_code == 200 and got.json() == want, (scale, got.text)


def test_admin_needs_a_valid_token_and_nothing_changes_without_one(served):
    before = mf.list_versions(served.root)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        r = _post(served.url, "/v1/admin/remove", {"ids": ["item-0001"]}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = _post(served.url, "/v1/admin/items",
                  {"items": [{"id": "new", "embedding": [0.1] * DIM, "label": "ant"}]}, headers=headers)
        assert r.status_code == 401
    assert mf.list_versions(served.root) == before
    with pytest.raises(ValueError, match="at least 16"):
        read_admin_token(env={"VISMEM_ADMIN_TOKEN": "short"})
    assert read_admin_token(env={"VISMEM_ADMIN_TOKEN": TOKEN + "\n"}) == TOKEN


def test_admin_remove_then_add_publish_versions_served_at_once(served):
    q = served.x[:4]
    with VismemClient(served.url, token=TOKEN) as c:
        top = [row[0]["id"] for row in c.neighbors(q, k=3)["neighbours"]]
        assert top == served.ids[:4].tolist()  # each item is its own nearest neighbour
        v0 = c.info()["version"]
        out = c.remove(ids=top[:2] + ["not-there"], reason="test")
        assert out["removed"] == 2 and out["not_found"] == 1 and out["version"] == v0 + 1
        # Served at once: the answer above came after the swap.
        after = c.neighbors(q, k=3)
        assert after["version"] == v0 + 1
        assert not {n["id"] for row in after["neighbours"] for n in row} & set(top[:2])
        assert c.info()["items"] == 298

        rng = np.random.default_rng(1)
        new = rng.standard_normal((3, DIM)).astype(np.float32)
        added = c.add_items(["new-0", "new-1", "new-2"], new, ["bee", "cat", "wasp"],
                            class_names=CLASSES + ["wasp"])
        assert added["items_added"] == 3 and added["version"] == v0 + 2
        res = c.classify(new, k=1)
        assert res["version"] == v0 + 2
        assert [r["label"] for r in res["results"]] == ["bee", "cat", "wasp"]
        assert [r["neighbours"][0]["id"] for r in res["results"]] == ["new-0", "new-1", "new-2"]
        assert c.info()["classes"] == CLASSES + ["wasp"]

        # A removed id cannot be added back (the forget list) without readmit; nothing is published.
        with pytest.raises(VismemError) as err:
            c.add_items([top[0]], served.x[:1], ["ant"])
        assert err.value.status == 409 and "nothing was published" in err.value.message
        assert c.info()["version"] == v0 + 2
        with pytest.raises(VismemError) as err:
            c.add_items(["x"], served.x[:1], ["dragon"])
        assert err.value.status == 409 and "dragon" in err.value.message
        with pytest.raises(VismemError) as err:
            c.remove(label="dragon")
        assert err.value.status == 409 and "unknown class" in err.value.message


def test_new_version_published_elsewhere_is_picked_up_without_dropping_requests(served):
    q = served.x[10:12]
    errors, versions, stop = [], [], threading.Event()
    seen = [[] for _ in range(3)]

    def hammer(mine):
        with VismemClient(served.url) as c:
            while not stop.is_set():
                try:
                    mine.append(c.classify(q, k=5)["version"])
                    versions.append(mine[-1])
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    errors.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(mine,), daemon=True) for mine in seen]
    for t in threads:
        t.start()
    try:  # the clients stop however this ends: a live one would hang pytest at exit
        deadline = time.time() + 10
        while not all(seen) and time.time() < deadline:  # every client has its first answer
            time.sleep(0.05)
        start_version = versions[-1]
        target = served.ids[10]
        published = remove_items(served.root, ids=[target], reason="published by another process")["version"]
        deadline = time.time() + 10
        while versions[-1] != published and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert published == start_version + 1 and versions[-1] == published
    assert all(mine == sorted(mine) and mine[-1] == published for mine in seen)  # versions only move forward
    with VismemClient(served.url) as c:
        ids = {n["id"] for row in c.neighbors(q, k=5)["neighbours"] for n in row}
        assert target not in ids
        assert c.info()["version_swaps"] >= 1


def test_admin_is_disabled_without_a_token(tmp_path):
    root = str(tmp_path / "m")
    make_memory(root, n=60)
    with Running(create_app(root, poll_s=0)) as srv:
        r = _post(srv.url, "/v1/admin/remove", {"ids": ["item-0001"]}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 403 and "VISMEM_ADMIN_TOKEN" in r.json()["error"]
        assert mf.list_versions(root) == [1]
        assert json.loads(httpx.get(srv.url + "/v1/info").text)["admin_enabled"] is False


def test_routed_search_on_a_kmeans_memory_equals_the_memory_itself(tmp_path):
    from memory import schema
    from pipelines.build import build_memory

    x, labels = clustered(800, DIM, 8, seed=9, noise=0.2)
    schema.write_embeddings(str(tmp_path / "emb.parquet"), schema.embedding_table(
        np.array([f"r-{i:04d}" for i in range(800)], dtype=object), x, labels % len(CLASSES)))
    root = str(tmp_path / "mem")
    build_memory(str(tmp_path / "emb.parquet"), root, num_shards=4, class_names=CLASSES, partition="kmeans",
                 kmeans_cells=16, backend="exact",
                 pipeline_args=["--runner=DirectRunner", "--direct_running_mode=in_memory"])
    q, _ = clustered(12, DIM, 8, seed=10, noise=0.2)
    with Memory.open(root) as mem:
        want = mem.classify(q, k=7, probe_shards=1)
        want_nb = mem.search(q, 5, probe_shards=2)
        everywhere = mem.search(q, 5)
    with Running(create_app(root)) as srv, VismemClient(srv.url) as c:
        res = c.classify(q, k=7, probe_shards=1)
        nb = c.neighbors(q, k=5, probe_shards=2)
        nb_all = c.neighbors(q, k=5)
    assert [[n["id"] for n in r["neighbours"]] for r in res["results"]] == want.neighbours.ids.tolist()
    assert [r["label_index"] for r in res["results"]] == want.predictions.tolist()
    assert [[n["id"] for n in row] for row in nb["neighbours"]] == want_nb.ids.tolist()
    assert [[n["id"] for n in row] for row in nb_all["neighbours"]] == everywhere.ids.tolist()
