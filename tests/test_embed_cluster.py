"""``--ray-address``: the same command against a real Ray cluster head (``ray start --head``) on loopback."""
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from conftest import kill_tree
from pipelines.encoders import load_encoder
from pipelines.outputs import read_run
from pipelines.sources import fashion_mnist


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embed_on_a_ray_start_head_cluster(tmp_path):
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths must fit AF_UNIX limits
    ray_exe = os.path.join(os.path.dirname(sys.executable), "ray")
    # Single-node Ray on loopback: without this, Ray swaps 127.0.0.1 for the machine's interface address.
    # Token authentication, as a real cluster should run: the head and the driver share a fresh token.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [ray_exe, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            assert head.poll() is None, head.stderr.read().decode()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.3)
        out = tmp_path / "out"
        res = subprocess.run(
            [sys.executable, "-m", "cli", "embed", "fashion-mnist", str(out), "--split", "test", "--limit", "60",
             "--shard-size", "20", "--image-size", "32", "--ray-address", f"127.0.0.1:{port}", "--no-progress"],
            capture_output=True, text=True, timeout=180, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads(res.stdout)
        assert summary["ray"]["address"] == f"127.0.0.1:{port}" and summary["ray"]["cluster_cpus"] == 2.0
        assert summary["shards"]["written_this_run"] == 3 and summary["counts"]["embedded"] == 60
        run = read_run(str(out))
        x, y = fashion_mnist("test")
        np.testing.assert_array_equal(run["labels"], y[:60])
        np.testing.assert_allclose(run["embeddings"], load_encoder("efficientnet-lite0", 32).embed(x[:60]), atol=1e-4)
    finally:
        kill_tree(head)  # the head this test started, and everything it started, by process id
        shutil.rmtree(temp_dir, ignore_errors=True)
