"""The HTTP re-ranker against a chat-completions server on loopback that the test starts."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from eval.rerank import HttpVisionLanguageReranker, Neighbour, rerank_accuracy

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


class _VLM(BaseHTTPRequestHandler):
    """Answers with the label of the neighbour list's 2nd entry (so re-ranking differs from 1-NN)."""

    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _VLM.seen.append((self.headers.get("Authorization"), body))
        if self.headers.get("Authorization") != "Bearer sekret":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": "bad key"}')
            return
        text = body["messages"][0]["content"][0]["text"]
        second = [line for line in text.splitlines() if line.startswith("2. label: ")][0]
        label = second[len("2. label: "):].split(" (similarity")[0]
        if "1. label: garbage-truck" in text:
            label = "I think it is a cat"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": label}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _VLM)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    _VLM.seen.clear()
    yield f"http://127.0.0.1:{srv.server_port}/v1/chat/completions"
    srv.shutdown()


def test_reranker_sends_images_labels_and_key_and_scores_answers(server):
    names = ["cat", "dog", "garbage-truck"]
    rr = HttpVisionLanguageReranker(server, "test-vlm", api_key="sekret")
    nbs = [[Neighbour(PNG, "cat", 0.9), Neighbour(PNG, "dog", 0.8), Neighbour(None, "dog", 0.7)],
           [Neighbour(PNG, "dog", 0.9), Neighbour(PNG, "cat", 0.8)],
           [Neighbour(PNG, "garbage-truck", 0.9), Neighbour(PNG, "garbage-truck", 0.8)]]
    res = rerank_accuracy(rr, [PNG, PNG, None], nbs, truth=[1, 1, 2], fallback=[0, 1, 2], class_names=names)
    # Answers: "dog" (right), "cat" (wrong), garbage -> fallback 2 (right).
    assert res == {"accuracy": 2 / 3, "fallback_accuracy": 2 / 3, "invalid_answers": 1, "queries": 3}
    auth, body = _VLM.seen[0]
    assert auth == "Bearer sekret" and body["model"] == "test-vlm"
    content = body["messages"][0]["content"]
    assert sum(c["type"] == "image_url" for c in content) == 3  # query + 2 neighbour images
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "1. label: cat (similarity 0.900)" in content[0]["text"]


def test_reranker_errors_name_the_problem(server):
    with pytest.raises(RuntimeError, match="answered HTTP 401"):
        HttpVisionLanguageReranker(server, "m", api_key="wrong").rerank(PNG, [Neighbour(PNG, "cat", 0.9)], ["cat"])
    with pytest.raises(ValueError, match="http\\(s\\) URL"):
        HttpVisionLanguageReranker("ftp://x", "m")


def test_eval_reports_reranked_accuracy_beside_the_voting_rules(tmp_path, server):
    import json
    import os
    import subprocess
    import sys

    from conftest import clustered
    from memory import schema, write_memory

    x, labels = clustered(500, 8, 3, seed=9, noise=0.4)
    write_memory(str(tmp_path / "m"), x[:400], labels[:400], [f"m{i}" for i in range(400)], num_shards=2,
                 class_names=["cat", "dog", "garbage-truck"])
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(100)], x[400:], labels[400:]))
    env = {**os.environ, "VISMEM_RERANK_API_KEY": "sekret"}
    vismem = os.path.join(os.path.dirname(sys.executable), "vismem")
    res = subprocess.run([vismem, "eval", str(tmp_path / "m"), str(tmp_path / "q.parquet"), "--out",
                          str(tmp_path / "e"), "--k-max", "20", "--rerank-endpoint", server, "--rerank-model", "vlm",
                          "--rerank-k", "5", "--rerank-queries", "30"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    rec = [r for r in map(json.loads, open(tmp_path / "e" / "metrics.jsonl")) if r["figure"] == "rerank"][0]
    assert rec["queries"] == 30 and rec["k"] == 5
    # The fake model answers with the 2nd neighbour's label: right for most queries of tight clusters.
    assert 0.5 < rec["accuracy"] <= 1.0 and len(_VLM.seen) == 30
    assert "**Re-ranked**" in open(tmp_path / "e" / "report.md").read()
