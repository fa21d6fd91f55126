"""The parts of the fault campaign: a fork server of ``vismem`` processes, the campaign's data, and the invariants.

:class:`ForkServer` is one process that imports vismem once and forks a fresh child per command
(the child runs ``cli.main.main`` as ``vismem`` would, in its own process group, and is SIGKILLed
by group); without it most random kill times would land in Python's imports (20 s on a loaded
machine) instead of in the work. ``ForkServer(spawn=True)`` runs real ``python -m cli`` processes.

:func:`check_memory` is what must hold after any kill: every listed version opens with its
checksums verified; the latest one's search equals an exact oracle over its logical items (the
items of its shards minus its tombstones); no removed id ever comes back; the logical items are
one of the states the command may leave (before or after it, never half of it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SERVER = r"""
import json, os, signal, sys, time
import cli.main, memory.memory, memory.mutations, pipelines.build, pipelines.compact  # noqa: F401 - warm
import apache_beam, gcsfs, scann  # noqa: F401 - warm
from apache_beam.runners.direct import direct_runner  # noqa: F401 - warm
requests, replies = sys.stdin, sys.stdout
starts = {}
for line in requests:
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            os.setsid()  # its own group: a kill takes its Beam workers too
            log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.stdin = open(os.devnull)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            rc = 1
            try:
                rc = cli.main.main(req["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 2
            except BaseException:
                import traceback
                traceback.print_exc()
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(rc or 0)
        starts[pid] = time.monotonic()
        out = {"pid": pid}
    elif req["op"] == "kill":
        alive = os.waitpid(req["pid"], os.WNOHANG)[0] == 0
        try:  # the whole group: a finished command's Beam workers may still be there
            os.killpg(req["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        if alive:
            os.waitpid(req["pid"], 0)
        out = {"killed": alive}
    else:  # wait
        _, status = os.waitpid(req["pid"], 0)
        out = {"rc": os.waitstatus_to_exitcode(status), "s": time.monotonic() - starts[req["pid"]]}
    replies.write(json.dumps(out) + "\n"); replies.flush()
"""


class ForkServer:
    """Starts ``vismem`` commands fast (forked from a warm process) or as fresh processes (``spawn``)."""

    def __init__(self, spawn: bool = False):
        self.spawn = spawn
        self.procs: dict = {}
        self.server = None if spawn else subprocess.Popen(
            [sys.executable, "-c", _SERVER], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True)

    def _ask(self, req: dict) -> dict:
        self.server.stdin.write(json.dumps(req) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def start(self, argv: list, log: str) -> int:
        """Start ``vismem ARGV`` with its output in ``log``; its process id."""
        if self.spawn:
            with open(log, "wb") as f:
                p = subprocess.Popen([sys.executable, "-m", "cli", *argv], cwd=ROOT, stdout=f, stderr=f,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs[p.pid] = (p, time.monotonic())
            return p.pid
        return self._ask({"op": "start", "argv": argv, "log": log})["pid"]

    def wait(self, pid: int) -> tuple[int, float]:
        """``(exit code, seconds it ran)``; a negative code is the signal that ended it."""
        if self.spawn:
            p, t0 = self.procs.pop(pid)
            return p.wait(), time.monotonic() - t0
        got = self._ask({"op": "wait", "pid": pid})
        return got["rc"], got["s"]

    def kill(self, pid: int) -> bool:
        """SIGKILL the command and every process it started; whether it was still running."""
        if self.spawn:
            p, _ = self.procs.pop(pid)
            alive = p.poll() is None
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
            return alive
        return self._ask({"op": "kill", "pid": pid})["killed"]

    def run(self, argv: list, log: str) -> tuple[int, float]:
        return self.wait(self.start(argv, log))

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
            self.server = None


def tail(log: str, n: int = 600) -> str:
    try:
        with open(log, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


# ---- where memories live: a local folder or a gs:// prefix (the emulator) ----

def copy_tree(src_local: str, dest: str) -> None:
    """Copy a local memory folder to ``dest`` (a local path or ``gs://``)."""
    from memory import storage

    if not storage.is_remote(dest):
        shutil.copytree(src_local, dest)
        return
    fs, p = storage.filesystem(dest)
    for folder, _, files in os.walk(src_local):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), src_local)
            fs.put_file(os.path.join(folder, name), f"{p}/{rel}")
    fs.invalidate_cache()


def remove_tree(path: str) -> None:
    from memory import storage

    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        fs.invalidate_cache()
    else:
        shutil.rmtree(path, ignore_errors=True)


def fresh_path(where: str, work: str, name: str) -> str:
    """A new, empty location for one trial: under ``work`` locally, or a new prefix in the bucket ``where``."""
    if where.startswith("gs://"):
        return f"{where.rstrip('/')}/{name}-{uuid.uuid4().hex[:8]}"
    return os.path.join(work, f"{name}-{uuid.uuid4().hex[:8]}")


# ---- the campaign's data ----

def make_inputs(work: str, seed: int, n: int = 600, n_new: int = 150, n_forget: int = 60, dim: int = 16) -> dict:
    """Seeded inputs: ``items`` (build), ``new`` (add), ``forget`` (remove); all vectors by id, for queries."""
    from memory import schema

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + n_new, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 4, n + n_new).astype(np.int32)
    ids = np.array([f"b{i:05d}" for i in range(n)] + [f"n{i:05d}" for i in range(n_new)], dtype=object)
    paths = {"items": os.path.join(work, "items.parquet"), "new": os.path.join(work, "new.parquet"),
             "forget": os.path.join(work, "forget.txt")}
    schema.write_embeddings(paths["items"], schema.embedding_table(ids[:n], x[:n], labels[:n]))
    schema.write_embeddings(paths["new"], schema.embedding_table(ids[n:], x[n:], labels[n:]))
    forget = sorted(rng.choice(ids[:n], n_forget, replace=False).tolist())
    with open(paths["forget"], "w") as f:
        f.write("\n".join(forget) + "\n")
    return {**paths, "vectors": dict(zip(ids.tolist(), x)), "base_ids": frozenset(ids[:n].tolist()),
            "new_ids": frozenset(ids[n:].tolist()), "forget_ids": frozenset(forget), "class_names": "c0,c1,c2,c3"}


# ---- the invariants ----

def logical_items(root: str, manifest) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of the version ``manifest``: its shards' items minus its tombstones."""
    from memory import removals
    from memory.items import read_items
    from memory.shard import read_vectors

    removed = removals.tombstones_by_shard(root, manifest)
    ids, vecs = [], []
    for e in manifest.shards:
        shard_ids = np.asarray(read_items(root, e, ["id"]).column("id").to_pylist(), dtype=object)
        keep = np.array([i not in removed.get(e.path, ()) for i in shard_ids], dtype=bool)
        ids.append(shard_ids[keep])
        vecs.append(read_vectors(root, e, np.flatnonzero(keep)))
    return np.concatenate(ids) if ids else np.zeros(0, object), np.concatenate(vecs) if vecs else np.zeros((0, 0))


def check_memory(root: str, allowed: dict, data: dict, k: int = 10) -> tuple[str, int]:
    """Check every invariant of the memory at ``root``; ``(name of the state it is in, checks made)``.

    ``allowed`` maps a state's name to its logical ids (``None``: no version published yet).

    Raises:
        AssertionError: an invariant does not hold (the message says which).
    """
    from memory import manifest as mf
    from memory import removals
    from memory.memory import Memory

    versions = mf.list_versions(root)
    if not versions:
        state = [name for name, ids in allowed.items() if ids is None]
        assert state, f"no version published at {root}, which the command may not leave"
        return state[0], 1
    checks = 0
    for v in versions:  # every version still listed must open, its checksums verified
        with Memory.open(root, v, verify=True):
            checks += 1
    manifest = mf.read_manifest(root)
    ids, vecs = logical_items(root, manifest)
    assert len(set(ids.tolist())) == len(ids), f"version {manifest.version} holds an item twice"
    state = [name for name, want in allowed.items() if want is not None and set(ids.tolist()) == set(want)]
    assert state, (f"version {manifest.version} holds {len(ids)} items, none of the allowed states "
                   f"({', '.join(f'{n}: {len(w) if w is not None else None}' for n, w in allowed.items())})")
    forgotten = set(removals.forget_list(root, manifest).column("id").to_pylist())
    checks += 2
    with Memory.open(root, verify=True) as mem:
        checks += _search_equals_oracle(mem, ids, vecs, forgotten, data, k)
    return state[0], checks


def _search_equals_oracle(mem, ids, vecs, forgotten: set, data: dict, k: int) -> int:
    """The memory's top-k against brute force over the logical items, for queries that include every
    removed item's own vector (which must find anything but itself)."""
    rng = np.random.default_rng(len(ids))
    known = data["vectors"]
    probe = sorted(forgotten & set(known))
    sample = rng.choice(ids, min(30, len(ids)), replace=False).tolist()
    q = np.stack([known[i] for i in probe + sample] + list(rng.standard_normal((10, vecs.shape[1]))))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    k = min(k, len(ids))
    nb = mem.search(q, k)
    sims = q.astype(np.float64) @ vecs.astype(np.float64).T
    want = -np.sort(-sims, axis=1)[:, :k]
    np.testing.assert_allclose(nb.sims, want, atol=1e-4, err_msg="search similarities differ from the oracle's")
    where = {i: r for r, i in enumerate(ids.tolist())}
    for row, (got_ids, got_sims) in enumerate(zip(nb.ids, nb.sims)):
        got = got_ids.tolist()
        assert not forgotten & set(got), f"removed ids returned: {sorted(forgotten & set(got))[:5]}"
        assert len(set(got)) == len(got), f"an id returned twice: {got}"
        missing = [i for i in got if i not in where]
        assert not missing, f"ids that are not logical items returned: {missing[:5]}"
        np.testing.assert_allclose(sims[row, [where[i] for i in got]], got_sims, atol=1e-4,
                                   err_msg="a returned id's similarity is not its own")
    return 3
