"""A real Ray head for the job-submission tests: ``ray start --head --block`` on loopback, own ports and temp dir.

Stopped by signalling the process group it started, never by ``ray stop``: that stops every Ray
instance of this user on the machine, other test runs included.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env() -> dict:
    """The environment of processes that talk to the head: this venv first on PATH, no inherited address."""
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int = 2):
    """Yields the head's job API address (``http://127.0.0.1:PORT``) once it answers."""
    from deploy import submit

    port, dash = free_port(), free_port()
    # Every fixed default port (the agent's 52365 above all) would collide with another Ray on this machine.
    agents = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
              f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    temp = f"/tmp/ray-vm-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats", *agents],
        env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                submit.client(url)  # answers once the job API is up (with Ray's auth token if enabled)
                break
            except ValueError:
                pass
            assert proc.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the Ray job API did not come up"
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group outlived the grace period
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        shutil.rmtree(temp, ignore_errors=True)
