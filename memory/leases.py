"""Leases: small files saying "version V (and a writer's folders) are in use until T", which ``gc`` respects.

A reader that pins a version for longer than one ``Memory.open`` (a serving fleet, a long
evaluation) takes a lease; ``gc`` never deletes the files of a version with an unexpired lease.
A writer (``add``, ``compact``) holds a *writer lease* for its whole run: on the version it derives
from (whose shards it reads) and on its token, so that ``gc`` leaves the folders it is writing
(``shards/vN.TOKEN``, ``state/vN.TOKEN``) even when it publishes at a later version than it began
with. Leases expire on their own, so a crashed holder cannot block collection for ever; a writer
lease whose process is gone on this very host is ignored at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from memory import manifest as mf
from memory import publishing, storage

LEASES = "leases"
WRITER_LEASE_S = 600.0  # renewed every third of it while the writer runs


def _body(version: int, seconds: float, holder: str | None, token: str | None) -> bytes:
    body = {"version": int(version), "expires_unix": time.time() + float(seconds),
            "holder": holder or f"{socket.gethostname()}:{os.getpid()}",
            "host": socket.gethostname(), "pid": os.getpid()}
    if token:
        body["token"] = token
    return json.dumps(body).encode()


def acquire(root: str, version: int, seconds: float, holder: str | None = None, *, token: str | None = None) -> str:
    """Hold ``version`` of the memory at ``root`` for ``seconds``; returns the lease's path.

    ``token``: a writer's token; ``gc`` then also leaves every folder named ``vNNNNNNNN.TOKEN``.
    """
    if seconds <= 0:
        raise ValueError(f"a lease must last a positive number of seconds, got {seconds}")
    path = storage.join(root, LEASES, f"v{int(version):08d}-{uuid.uuid4().hex[:12]}.json")
    storage.write_bytes_atomic(path, _body(version, seconds, holder, token))
    return path


def release(path: str) -> None:
    storage.remove(path)


def _gone(body: dict) -> bool:
    """A writer lease whose process has ended on this host (a SIGKILLed add, say)."""
    if "token" not in body or body.get("host") != socket.gethostname() or not isinstance(body.get("pid"), int):
        return False
    pid = body["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # killed but not yet reaped by its parent: a zombie holds nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _scan(root: str, now: float):
    """``(name, version, expiry, body, holds)`` of every lease file; ``holds``: unexpired and its holder
    not gone (unreadable lease files hold for a day from now: better to keep files than to delete a
    version someone reads)."""
    for name in storage.list_names(storage.join(root, LEASES)):
        path = storage.join(root, LEASES, name)
        try:
            body = json.loads(storage.read_bytes(path))
            version, expires = int(body["version"]), float(body["expires_unix"])
        except FileNotFoundError:
            continue  # released meanwhile
        except (ValueError, KeyError, TypeError):
            if not name.startswith("v") or not name[1:9].isdigit():
                continue
            version, expires, body = int(name[1:9]), now + 86400, {}
        yield name, version, expires, body, expires > now and not _gone(body)


def _live(root: str, now: float):
    for _, version, expires, body, holds in _scan(root, now):
        if holds:
            yield version, expires, body


def prune(root: str, now: float | None = None) -> int:
    """Delete the lease files that hold nothing any more (expired, or of a writer gone); how many.

    Only files read here and found dead go: a lease taken meanwhile is not in this listing.
    """
    dead = [name for name, _, _, _, holds in _scan(root, time.time() if now is None else now) if not holds]
    for name in dead:
        storage.remove(storage.join(root, LEASES, name))
    return len(dead)


def held_versions(root: str, now: float | None = None) -> dict[int, float]:
    """``{version: latest expiry}`` over the unexpired leases."""
    held: dict[int, float] = {}
    for version, expires, _ in _live(root, time.time() if now is None else now):
        held[version] = max(expires, held.get(version, 0.0))
    return held


def held_tokens(root: str, now: float | None = None) -> set[str]:
    """The tokens of the writers running now: ``gc`` leaves their folders."""
    return {b["token"] for _, _, b in _live(root, time.time() if now is None else now) if b.get("token")}


@contextlib.contextmanager
def writer_lease(root: str, token: str, *, holder: str, seconds: float = WRITER_LEASE_S):
    """Hold the latest version (yielded: the writer's parent) and the writer's folders until the block ends.

    The lease is taken, then the parent is checked to still be the latest: a ``gc`` that read the
    leases before this one was written kept every version from its own latest on, so the parent
    (latest after the lease) is safe. The lease is renewed on a timer while the block runs.
    """
    for attempt in range(publishing.ATTEMPTS):
        time.sleep(publishing.backoff(attempt) if attempt else 0)
        parent = mf.read_manifest(root)
        path = acquire(root, parent.version, seconds, holder, token=token)
        if mf.latest_version(root) == parent.version:
            break
        release(path)
    else:
        raise mf.ConcurrentUpdate(root, parent.version + 1, f"other writers on each of {publishing.ATTEMPTS} tries "
                                  f"to hold the latest version ({holder} gave up)")
    stop = threading.Event()

    def renew():
        while not stop.wait(seconds / 3):
            try:
                storage.write_bytes_atomic(path, _body(parent.version, seconds, holder, token))
            except OSError:  # the next tick tries again; the lease is still valid until it expires
                pass

    timer = threading.Thread(target=renew, name=f"lease-{token}", daemon=True)
    timer.start()
    try:
        yield parent
    finally:
        stop.set()
        timer.join()
        release(path)
