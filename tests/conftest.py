"""Shared fixtures: seeded clustered embeddings with a brute-force oracle, and a real GCS emulator."""
import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

# Ray's local head waits 30 s for its GCS port by default; on a loaded 2-core machine that once
# expired in a fresh clone's run (two setup errors). The CLI waits 120 s (cli/main.py); so do tests.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")

# Arrow's I/O threads can abort the interpreter while it tears down (apache/arrow#34314: "terminate
# called without an active exception", status 134), which once turned a green run into make's rc 2.
# Once pytest has decided its status and the exit handlers registered after this one have run (Ray's,
# Beam's), end the process with that status instead of finalising the interpreter.
_session_status: list = []


def pytest_sessionfinish(session, exitstatus):
    _session_status[:] = [int(exitstatus)]


def _leave():
    if _session_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_session_status[0])


atexit.register(_leave)


def clustered(n, dim, clusters, seed, noise=0.3):
    """Unit vectors in ``clusters`` Gaussian blobs; labels are the blob ids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def oracle_topk(queries, items, ids, k):
    """Brute force in float64: order by similarity desc, then id asc."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    s = q.astype(np.float64) @ items.astype(np.float64).T
    ids = np.asarray(ids).astype(str)
    out_ids, out_sims = [], []
    for row in s:
        order = np.lexsort((ids, -row))[:k]
        out_ids.append(ids[order])
        out_sims.append(row[order])
    return np.array(out_ids, dtype=object), np.array(out_sims)


def wait_for_port(port: int, proc, what: str, timeout_s: float = 30) -> None:
    """Wait until a server ``proc`` listens on loopback ``port``; kill it and fail after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


@pytest.fixture(scope="session")
def gcs_emulator():
    """A gcp-storage-emulator on loopback; yields a fresh ``gs://`` bucket URL per session."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bucket = "vismem-test"
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    proc = subprocess.Popen(
        [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", bucket, "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc, "gcp-storage-emulator")
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    try:
        yield f"gs://{bucket}"
    finally:
        proc.terminate()
        proc.wait(10)
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture
def gcs_path(gcs_emulator):
    return f"{gcs_emulator}/{uuid.uuid4().hex}"


def kill_tree(proc):
    """SIGKILL a started process and every process it started (e.g. a Ray head and its workers), by id."""
    import psutil

    root = psutil.Process(proc.pid)
    tree = [root] + root.children(recursive=True)
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    psutil.wait_procs(tree, timeout=30)
