"""Reader leases: a small file saying "version V is in use until T", which ``vismem gc`` respects.

A reader that pins a version for longer than one ``Memory.open`` (a serving fleet, a long
evaluation) takes a lease; ``gc`` never deletes the files of a version with an unexpired lease.
Leases expire on their own, so a crashed reader cannot block collection for ever.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

from memory import storage

LEASES = "leases"


def acquire(root: str, version: int, seconds: float, holder: str | None = None) -> str:
    """Hold ``version`` of the memory at ``root`` for ``seconds``; returns the lease's path."""
    if seconds <= 0:
        raise ValueError(f"a lease must last a positive number of seconds, got {seconds}")
    path = storage.join(root, LEASES, f"v{int(version):08d}-{uuid.uuid4().hex[:12]}.json")
    body = {"version": int(version), "expires_unix": time.time() + float(seconds),
            "holder": holder or f"{socket.gethostname()}:{os.getpid()}"}
    storage.write_bytes_atomic(path, json.dumps(body).encode())
    return path


def release(path: str) -> None:
    storage.remove(path)


def held_versions(root: str, now: float | None = None) -> dict[int, float]:
    """``{version: latest expiry}`` over the unexpired leases (unreadable lease files count as held
    for a day from now: better to keep files than to delete a version someone reads)."""
    now = time.time() if now is None else now
    held: dict[int, float] = {}
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
            version, expires = int(name[1:9]), now + 86400
        if expires > now:
            held[version] = max(expires, held.get(version, 0.0))
    return held
