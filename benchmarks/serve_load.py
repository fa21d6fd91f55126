"""Load and faults for ``vismem serve``: N concurrent clients on loopback, bounded in time and count.

Phases, each against a real ``vismem serve`` process:
  1. steady:   N clients classify for T seconds (or until --max-requests): throughput, p50/p99, errors.
  2. mutating: the same load while an admin ``add`` and an admin ``remove`` publish two new versions
               underneath; every answer must succeed, and versions only move forward.
  3. restart:  the server is killed (SIGKILL) and started again; no removed item comes back and the
               added items are there.

Run (about 1-2 minutes on 2 cores with the defaults; the issue's 1M-item memory is --items 1000000):
    python benchmarks/serve_load.py --items 100000 --clients 8 --duration 20 --out bench-out/serve_load.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from deploy.client import VismemClient  # noqa: E402
from memory import write_memory  # noqa: E402
from search import make_data, write_json  # noqa: E402  (benchmarks/search.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vismem serve`` as a child process on a loopback port."""

    def __init__(self, memory: str, token: str, poll_s: float):
        self.memory, self.token, self.poll_s = memory, token, poll_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120.0):
        vismem = os.path.join(os.path.dirname(sys.executable), "vismem")
        env = {**os.environ, "VISMEM_ADMIN_TOKEN": self.token}
        self.proc = subprocess.Popen([vismem, "serve", self.memory, "--port", str(self.port), "--poll-s",
                                      str(self.poll_s), "--log-level", "warning"], env=env)
        deadline = time.time() + timeout
        with VismemClient(self.url, timeout=2) as c:
            while True:
                try:
                    return c.health()
                except Exception:  # noqa: BLE001 - not up yet
                    if self.proc.poll() is not None:
                        raise RuntimeError("vismem serve exited during start-up") from None
                    if time.time() > deadline:
                        raise RuntimeError("vismem serve did not answer in time") from None
                    time.sleep(0.2)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def run_load(url, queries, *, clients, duration, max_requests, batch, k, during=None) -> dict:
    """``clients`` threads classify random query batches until ``duration`` s or ``max_requests``."""
    lat, errors, versions = [], [], [[] for _ in range(clients)]
    count = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def client(i):
        rng = np.random.default_rng(i)
        with VismemClient(url, timeout=60) as c:
            while not stop.is_set():
                with lock:
                    if count[0] >= max_requests:
                        return
                    count[0] += 1
                q = queries[rng.integers(0, len(queries), batch)]
                t0 = time.perf_counter()
                try:
                    res = c.classify(q, k=k, neighbours=True)
                    dt = time.perf_counter() - t0
                    with lock:
                        lat.append(dt)
                    versions[i].append(res["version"])
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        errors.append(repr(exc)[:300])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    side = None
    if during:
        side = threading.Thread(target=during)
        side.start()
    deadline = t0 + duration
    while time.perf_counter() < deadline and any(t.is_alive() for t in threads):
        time.sleep(0.05)
    if side:
        side.join()  # the window stretches to the mutations' end, then serves the last version a while
        end = time.perf_counter() + 2.0
        while time.perf_counter() < end and any(t.is_alive() for t in threads):
            time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1e3
    return {
        "requests": len(lat), "errors": len(errors), "error_examples": errors[:3], "seconds": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 1), "queries_per_s": round(len(lat) * batch / wall, 1),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 1) if len(lat) else None,
        "versions_seen": sorted({v for vs in versions for v in vs}),
        "versions_monotonic_per_client": all(vs == sorted(vs) for vs in versions),
    }


@dataclasses.dataclass
class Change:
    """What the mutating phase adds and removes."""

    new: np.ndarray  # embeddings of the items added
    new_ids: list
    new_classes: list
    gone: list  # ids removed
    removed_x: np.ndarray  # their embeddings

    @classmethod
    def pick(cls, x, labels, names, items, count):
        """``count`` items after the memory's ``items`` are added; ``count`` evenly spaced ones removed."""
        gone = [f"item-{i:08d}" for i in range(0, items, max(1, items // count))][:count]
        return cls(new=x[items:items + count], new_ids=[f"added-{i:06d}" for i in range(count)],
                   new_classes=[names[i] for i in labels[items:items + count]], gone=gone,
                   removed_x=x[[int(g.split("-")[1]) for g in gone]])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000, help="memory size (the issue's figure: 1000000)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--backend", choices=("scann", "exact"), default="scann")
    p.add_argument("--memory", default=None, help="serve this existing memory instead of writing one (it is changed)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load phase")
    p.add_argument("--max-requests", type=int, default=100_000, help="requests per phase at most")
    p.add_argument("--batch", type=int, default=1, help="queries per request")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--mutate-items", type=int, default=500, help="items added, and items removed, in phase 2")
    p.add_argument("--out", default="bench-out/serve_load.json")
    return p.parse_args(argv)


def write_test_memory(a, path, x, labels, names, report):
    """The first ``a.items`` items as a memory at ``path``; the seconds it took go in ``report``."""
    t0 = time.perf_counter()
    write_memory(path, x[:a.items], labels[:a.items], [f"item-{i:08d}" for i in range(a.items)],
                 num_shards=a.shards, backend=a.backend, class_names=names)
    report["write_memory_s"] = round(time.perf_counter() - t0, 1)
    print(f"wrote {a.items} items in {report['write_memory_s']} s", file=sys.stderr)


def publish(url, token, change, mutations):
    """Add the new items, then remove the chosen ones: two new versions, each timed into ``mutations``."""
    with VismemClient(url, token=token, timeout=600) as admin:
        t = time.perf_counter()
        added = admin.add_items(change.new_ids, change.new, change.new_classes)
        mutations["add"] = {"version": added["version"], "items_added": added["items_added"],
                            "seconds": round(time.perf_counter() - t, 2)}
        t = time.perf_counter()
        removed = admin.remove(ids=change.gone, reason="load test")
        mutations["remove"] = {"version": removed["version"], "removed": removed["removed"],
                               "seconds": round(time.perf_counter() - t, 2)}


def bench_mutating(server, token, queries, load, change, delay):
    """Phase 2: the load while ``change`` is published ``delay`` s in; returns the load and the mutations."""
    mutations = {}

    def mutate():
        time.sleep(delay)
        try:
            publish(server.url, token, change, mutations)
        except Exception as exc:  # noqa: BLE001 - reported, and the run fails
            mutations["error"] = repr(exc)[:500]

    return run_load(server.url, queries, **load, during=mutate), mutations


def bench_restart(server, change, k):
    """Phase 3: kill and restart the server, then look for the removed items and the added ones."""
    server.kill()
    t0 = time.perf_counter()
    health = server.start()
    out = {"restart_s": round(time.perf_counter() - t0, 1), "version": health["version"]}
    with VismemClient(server.url) as c:
        seen = set()
        for s in range(0, len(change.removed_x), 100):  # each removed item's own embedding: it would be rank 0
            for row in c.neighbors(change.removed_x[s:s + 100], k=k)["neighbours"]:
                seen |= {n["id"] for n in row}
        back = sorted(seen & set(change.gone))
        found = c.neighbors(change.new[:100], k=1)["neighbours"]
        added_found = sum(row[0]["id"] == i for row, i in zip(found, change.new_ids[:100]))
    out.update({"removed_items_returned": len(back), "examples": back[:5],
                "added_items_found_as_own_nearest": f"{added_found}/{min(100, len(change.new_ids))}"})
    return out


def run_phases(a, server, token, queries, change, report):
    """Start the server, then the three phases, each into ``report``."""
    t0 = time.perf_counter()
    server.start()
    report["server_start_s"] = round(time.perf_counter() - t0, 1)
    load = dict(clients=a.clients, duration=a.duration, max_requests=a.max_requests, batch=a.batch, k=a.k)
    report["steady"] = run_load(server.url, queries, **load)
    print("steady:", json.dumps(report["steady"]), file=sys.stderr)
    report["mutating"], report["mutations"] = bench_mutating(server, token, queries, load, change,
                                                             delay=min(2.0, a.duration / 4))
    print("mutating:", json.dumps(report["mutating"]), json.dumps(report["mutations"]), file=sys.stderr)
    report["restart"] = bench_restart(server, change, a.k)
    print("restart:", json.dumps(report["restart"]), file=sys.stderr)


def passed(report) -> bool:
    return ("error" not in report["mutations"] and report["steady"]["errors"] == 0
            and report["mutating"]["errors"] == 0 and report["mutating"]["versions_monotonic_per_client"]
            and report["restart"]["removed_items_returned"] == 0)


def main(argv=None) -> int:
    a = parse_args(argv)
    token = "load-test-" + os.urandom(12).hex()
    work = tempfile.mkdtemp(prefix="vismem-load-")
    report = {"config": vars(a), "machine": {"cpus": os.cpu_count()}}
    x, labels, _ = make_data(a.items + a.mutate_items + 2000, a.dim, a.classes, 0, seed=0)
    names = [f"class-{i:03d}" for i in range(a.classes)]
    memory = a.memory or os.path.join(work, "memory")
    if not a.memory:
        write_test_memory(a, memory, x, labels, names, report)
    change = Change.pick(x, labels, names, a.items, a.mutate_items)
    server = Server(memory, token, poll_s=1.0)
    try:
        run_phases(a, server, token, x[-2000:], change, report)
    finally:
        server.stop()
    report["ok"] = ok = passed(report)
    if a.out:
        write_json(a.out, report)
    print(json.dumps(report, indent=1))
    if not a.memory:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
