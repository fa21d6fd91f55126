"""Real Ray clusters for the tests: ``ray start --head --block`` on loopback with its own ports and temp dir
(:func:`ray_head`, for job submission), and :class:`Cluster`, a head plus worker nodes to lose.

Stopped by signalling the processes they started, never by ``ray stop``: that stops every Ray
instance of this user on the machine, other test runs included.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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



class Node:
    """One ``ray start --block`` process of a :class:`Cluster` (its process tree is the node)."""

    def __init__(self, proc: subprocess.Popen, temp: str):
        self.proc, self.temp = proc, temp

    def _tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def runs(self, title: str) -> bool:
        """Whether a process of this node has ``title`` in its command line (Ray titles actors ``ray::Class``)."""
        import psutil

        for p in self._tree():
            try:
                if title in " ".join(p.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    def kill(self) -> None:
        """SIGKILL the node's processes all at once: a machine lost, with no chance to clean up.

        By process tree as well as by group: Ray's workers run in process groups of their own.
        """
        import psutil

        tree = self._tree()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        self.proc.wait(30)


# A lost node is declared dead after period x threshold (Ray's defaults: 3 s x 5); then its actors restart.
FAST_HEALTH_CHECKS = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 5}'


class Cluster:
    """A real multi-node Ray cluster on loopback: ``ray start --head`` plus ``ray start --address`` nodes.

    Every process that talks to it (nodes, drivers, ``ray status``) gets :attr:`env`: token
    authentication with a fresh token, as Ray 2.5x enables by default. Use as a context manager; each
    node is stopped by killing its processes (:meth:`Node.kill`), never by ``ray stop``.
    """

    def __init__(self, head_cpus: int):
        import secrets

        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**job_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.nodes: list[Node] = []
        try:
            self.head = self._start(["--head", f"--port={self.port}", f"--num-cpus={head_cpus}",
                                     "--include-dashboard=false", f"--system-config={FAST_HEALTH_CHECKS}"])
        except BaseException:
            self.__exit__()
            raise

    def _start(self, args: list, attempts: int = 3) -> Node:
        """``ray start --block ARGS`` once it says the node is up; again when Ray gave up waiting for its own
        raylet (a fixed 30 s, which a loaded machine can exceed)."""
        for attempt in range(attempts):
            temp = f"/tmp/rc-{uuid.uuid4().hex[:6]}"  # short: AF_UNIX socket paths must fit
            log = tempfile.TemporaryFile()
            proc = subprocess.Popen([os.path.join(BIN, "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                                     f"--temp-dir={temp}", "--disable-usage-stats", *args],
                                    env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            node = Node(proc, temp)
            self.nodes.append(node)
            deadline = time.time() + 180
            while True:
                log.seek(0)
                text = log.read().decode(errors="replace")
                if "Ray runtime started" in text:
                    return node
                if proc.poll() is not None:
                    break
                assert time.time() < deadline, f"ray start did not come up: {text[-2000:]}"
                time.sleep(0.3)
            node.kill()
            assert "timed out during startup" in text and attempt + 1 < attempts, f"ray start exited: {text[-2000:]}"
        raise AssertionError("unreachable")

    def add_node(self, cpus: int, resources: dict | None = None) -> Node:
        import json

        return self._start([f"--address={self.address}", f"--num-cpus={cpus}",
                            f"--resources={json.dumps(resources or {})}"])

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        for n in reversed(self.nodes):
            n.kill()
            shutil.rmtree(n.temp, ignore_errors=True)
