"""``vismem serve`` as a user runs it: a real process, token from a file, loopback only, kill -9 and restart."""
import io
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import clustered
from deploy.client import VismemClient, VismemError
from deploy.serving import create_app, read_admin_token
from memory import write_memory
from test_serve import Running, free_port

VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")
TOKEN = "file-token-abcdefghijklmnop"


def _start(args, env=None):
    proc = subprocess.Popen([VISMEM, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    return proc


def _wait_up(proc, url, timeout=60):
    deadline = time.time() + timeout
    with VismemClient(url, timeout=2) as c:
        while True:
            try:
                return c.health()
            except Exception:  # noqa: BLE001 - not up yet
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "vismem serve did not come up"
                time.sleep(0.2)


def test_help_teaches_and_remote_binding_needs_asking(tmp_path):
    res = subprocess.run([VISMEM, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "vismem serve /data/fmnist-memory --port 8000" in res.stdout
    assert "/v1/classify" in res.stdout and "VISMEM_ADMIN_TOKEN" in res.stdout
    words = " ".join(res.stdout.split())
    assert "admin endpoints answer 409" in words and "refuse admin changes with 409" in words
    x, labels = clustered(50, 8, 2, seed=3)
    write_memory(str(tmp_path / "m"), x, labels, [f"i{i}" for i in range(50)], class_names=["a", "b"])
    res = subprocess.run([VISMEM, "serve", str(tmp_path / "m"), "--host", "0.0.0.0"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "--allow-remote" in res.stderr and "refusing to listen on 0.0.0.0" in res.stderr
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_admin_token(str(tmp_path / "short"))


def test_removed_items_stay_removed_after_kill_and_restart(tmp_path):
    x, labels = clustered(400, 16, 4, seed=8, noise=0.2)
    root = str(tmp_path / "m")
    write_memory(root, x, labels, [f"i{i:03d}" for i in range(400)], num_shards=3, class_names=list("abcd"))
    (tmp_path / "token").write_text(TOKEN + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [root, "--port", str(port), "--admin-token-file", str(tmp_path / "token"), "--log-level", "warning"]
    proc = _start(args, env={"VISMEM_ADMIN_TOKEN": ""})
    try:
        assert _wait_up(proc, url)["version"] == 1
        gone = [f"i{i:03d}" for i in range(0, 400, 20)]
        with VismemClient(url, token=TOKEN) as admin:
            assert admin.remove(ids=gone)["removed"] == 20
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)
        proc = _start(args)
        assert _wait_up(proc, url)["version"] == 2
        with VismemClient(url) as c:
            nb = c.neighbors(x[0:400:20], k=5)["neighbours"]  # the removed items' own embeddings
            assert not {n["id"] for row in nb for n in row} & set(gone)
            assert all(len(row) == 5 for row in nb) and c.info()["items"] == 380
        with VismemClient(url, token="not-the-token-0123456") as bad, pytest.raises(VismemError) as err:
            bad.remove(ids=["i001"])
        assert err.value.status == 401
    finally:
        proc.terminate()
        proc.wait(20)
        proc.stdout.close()


def _png(seed) -> bytes:
    """A distinct textured image (flat colours give near-zero features)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_images_are_embedded_with_the_configured_encoder(tmp_path, capsys):
    from cli.main import main
    from pipelines.encoders import load_encoder
    from pipelines.images import decode_image

    pngs = [_png(seed) for seed in range(6)]
    enc = load_encoder("efficientnet-lite0", 32)
    emb = enc.embed(np.stack([decode_image(p, 32) for p in pngs]))
    root = str(tmp_path / "m")
    write_memory(root, emb, np.arange(6) % 3, [f"img{i}" for i in range(6)], class_names=["r", "g", "b"],
                 encoder=enc.spec.to_manifest())
    # No --image-size: the memory's own (32), not the encoder's default (224).
    with Running(create_app(root, encoder="efficientnet-lite0", poll_s=0)) as srv:
        with VismemClient(srv.url) as c:
            assert c.info()["serving_encoder"] == enc.spec.to_manifest()
            res = c.classify(images=pngs, k=1)
            assert [r["neighbours"][0]["id"] for r in res["results"]] == [f"img{i}" for i in range(6)]
            assert [r["label"] for r in res["results"]] == ["r", "g", "b", "r", "g", "b"]
            assert all(r["neighbours"][0]["sim"] > 0.999 for r in res["results"])
            with pytest.raises(VismemError) as err:
                c.classify(images=[b"not an image"], k=1)
            assert err.value.status == 422 and "images[0]" in err.value.message
            # Embeddings that say they were made at another image size are refused, both sides named.
            with pytest.raises(VismemError) as err:
                c.neighbors(emb[:1], k=1, encoder={"name": "efficientnet-lite0", "image_size": 64})
            assert err.value.status == 409 and "image_size=32" in err.value.message, err.value
            assert "image_size=64" in err.value.message
            assert c.neighbors(emb[:1], k=1, encoder=enc.spec.to_manifest())["neighbours"][0][0]["id"] == "img0"
    # A server whose encoder sees images otherwise than the memory's items were seen is refused at start.
    with pytest.raises(ValueError) as err:
        create_app(root, encoder="efficientnet-lite0", image_size=48, poll_s=0)
    assert "image_size=32" in str(err.value) and "image_size=48" in str(err.value), err.value
    assert main(["serve", root, "--port", str(free_port()), "--encoder", "efficientnet-lite0",
                 "--image-size", "48"]) == 2
    out = capsys.readouterr().err
    assert out.startswith("vismem serve: error: --encoder does not match memory") and out.count("\n") == 1, out


def test_bad_serve_flags_are_one_line_errors(tmp_path, capsys):
    from cli.main import main

    x, labels = clustered(30, 8, 2, seed=4)
    root = str(tmp_path / "m")
    write_memory(root, x, labels, [f"i{i}" for i in range(30)], class_names=["a", "b"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cases = [(["--port", "99999"], "--port must be between 1 and 65535, got 99999"),
                 (["--port", "0"], "--port must be between 1 and 65535"),
                 (["--port", str(busy)], f"cannot listen on 127.0.0.1:{busy}"),
                 (["--max-k", "0"], "--max-k must be >= 1"), (["--max-batch", "-1"], "--max-batch must be >= 1"),
                 (["--max-body-mb", "0"], "--max-body-mb must be >= 1"), (["--version", "0"], "--version must be >= 1"),
                 (["--poll-s", "-1"], "--poll-s must be a finite number >= 0"),
                 (["--lease-s", "nan"], "--lease-s must be a finite number >= 0"),
                 (["--version", "7"], "7")]
        for flags, words in cases:
            assert main(["serve", root, *flags]) == 2, flags
            err = capsys.readouterr().err
            assert err.startswith("vismem serve: error: ") and err.count("\n") == 1 and words in err, (flags, err)
