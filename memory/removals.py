"""Removed items, recorded in a memory's versioned state: tombstones and the forget list.

A removal publishes a new manifest version whose ``tombstones`` entry points at a Parquet table of
``(shard, id)`` pairs: items still present in that shard's files (the shard is keyed by its path,
unique within a memory) that every search of the version excludes. Compaction rewrites those shards
without the items and drops their tombstones. The ``forget`` entry points at the table of every id
ever removed (``id``, ``version``, ``reason``); an ``add`` refuses those ids unless they are
re-admitted explicitly. Both files are checked against the checksum their manifest records.

Two kinds of removal share this state (``memory.mutations`` writes both): ``remove`` (unlearning)
tombstones the items and forgets their ids with the caller's reason; hard pruning (``vismem prune
--hard``) only tombstones them, its reason :data:`PRUNED` in the version's record
(``change_detail``): pruning selects data, so a pruned id is not forgotten and may be added again.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import storage
from memory.manifest import Manifest, MemoryFormatError, StateRef

TOMBSTONES_SCHEMA = pa.schema([("shard", pa.string()), ("id", pa.string())])
FORGET_SCHEMA = pa.schema([("id", pa.string()), ("version", pa.int64()), ("reason", pa.string())])
PRUNED = "pruned"  # the reason hard pruning records; never on the forget list


def state_path(version: int, name: str, token: str) -> str:
    """Path (relative to the memory) of a state file first published by ``version``."""
    return f"state/v{version:08d}.{token}/{name}"


def write_table(root: str, rel: str, table: pa.Table) -> StateRef:
    """Write a state table at ``root/rel``; its manifest entry."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes_atomic(storage.join(root, rel), data)
    return StateRef(path=rel, count=len(table), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def read_table(root: str, ref: StateRef | None, schema: pa.Schema) -> pa.Table:
    """The state table ``ref`` points at (empty when there is none), checksum verified."""
    if ref is None:
        return schema.empty_table()
    path = storage.join(root, ref.path)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError as exc:
        raise MemoryFormatError(f"removal state {path} is missing") from exc
    if len(data) != ref.bytes or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise MemoryFormatError(f"removal state {path} is corrupt: it does not match its checksum")
    return pq.read_table(pa.BufferReader(data))


def tombstones(root: str, manifest: Manifest) -> pa.Table:
    return read_table(root, manifest.tombstones, TOMBSTONES_SCHEMA)


def forget_list(root: str, manifest: Manifest) -> pa.Table:
    return read_table(root, manifest.forget, FORGET_SCHEMA)


def tombstones_by_shard(root: str, manifest: Manifest) -> dict[str, set]:
    """``{shard path: set of removed ids}`` for the version ``manifest`` describes."""
    table = tombstones(root, manifest)
    out: dict[str, set] = {}
    for shard, item in zip(table.column("shard").to_pylist(), table.column("id").to_pylist()):
        out.setdefault(shard, set()).add(item)
    return out


def tombstones_table(pairs) -> pa.Table:
    """A tombstones table from ``(shard path, id)`` pairs, sorted so equal states give equal files."""
    pairs = sorted(set(pairs))
    return pa.table({"shard": pa.array([p[0] for p in pairs], pa.string()),
                     "id": pa.array([p[1] for p in pairs], pa.string())}, schema=TOMBSTONES_SCHEMA)


def forget_table(rows) -> pa.Table:
    """A forget-list table from ``(id, version, reason)`` rows (first removal of an id wins)."""
    seen = {}
    for item, version, reason in rows:
        seen.setdefault(str(item), (int(version), str(reason)))
    keys = sorted(seen)
    return pa.table({"id": pa.array(keys, pa.string()),
                     "version": pa.array(np.array([seen[k][0] for k in keys], np.int64)),
                     "reason": pa.array([seen[k][1] for k in keys], pa.string())}, schema=FORGET_SCHEMA)
