"""``vismem serve`` as a user runs it: a real process, token from a file, loopback only, kill -9 and restart."""
import io
import os
import signal
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


def test_images_are_embedded_with_the_configured_encoder(tmp_path):
    from pipelines.encoders import load_encoder
    from pipelines.images import decode_image

    pngs = [_png(seed) for seed in range(6)]
    enc = load_encoder("efficientnet-lite0", 32)
    emb = enc.embed(np.stack([decode_image(p, 32) for p in pngs]))
    root = str(tmp_path / "m")
    write_memory(root, emb, np.arange(6) % 3, [f"img{i}" for i in range(6)], class_names=["r", "g", "b"])
    with Running(create_app(root, encoder="efficientnet-lite0", image_size=32, poll_s=0)) as srv:
        with VismemClient(srv.url) as c:
            res = c.classify(images=pngs, k=1)
            assert [r["neighbours"][0]["id"] for r in res["results"]] == [f"img{i}" for i in range(6)]
            assert [r["label"] for r in res["results"]] == ["r", "g", "b", "r", "g", "b"]
            assert all(r["neighbours"][0]["sim"] > 0.999 for r in res["results"])
            with pytest.raises(VismemError) as err:
                c.classify(images=[b"not an image"], k=1)
            assert err.value.status == 422 and "images[0]" in err.value.message
