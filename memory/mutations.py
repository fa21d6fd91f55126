"""Changing a memory: remove (unlearning), plan compaction, list versions, collect garbage.

Every change publishes a new manifest version derived from its parent (``derive_manifest``);
nothing already published is modified, so a reader pinned to a version is never affected. Remove
only writes small state files and a manifest, so it is durable the moment it returns; the Beam jobs
(``pipelines.build`` for build and add, ``pipelines.compact``) publish through the same helpers.
"""
from __future__ import annotations

import re
import time
import uuid

import numpy as np
import pyarrow.parquet as pq

from memory import leases, removals, storage
from memory import manifest as mf
from memory.items import read_items_at
from memory.manifest import Manifest, ShardEntry, StateRef

_VERSION_DIR = re.compile(r"^v(\d{8})(?:\.|$)")


def new_token() -> str:
    """A short random name part that keeps two attempts at one version apart."""
    return uuid.uuid4().hex[:8]


def next_version(root: str) -> int:
    latest = mf.latest_version(root)
    return 1 if latest is None else latest + 1


def derive_manifest(parent: Manifest, *, version: int, change: str, detail: dict,
                    shards: list[ShardEntry] | None = None, tombstones: StateRef | None | str = "keep",
                    forget: StateRef | None | str = "keep", class_names=None) -> Manifest:
    """The manifest of ``version``: the parent's, with new shards and/or removal state.

    ``tombstones`` and ``forget`` are state entries (``removals.write_table``), None to drop, or
    ``"keep"`` the parent's; ``removed_count`` follows the tombstones.
    """
    tombstones = parent.tombstones if tombstones == "keep" else tombstones
    forget = parent.forget if forget == "keep" else forget
    return Manifest.new(
        version=version, dim=parent.dim, class_names=class_names or parent.class_names, backend=parent.backend,
        shards=parent.shards if shards is None else shards, encoder=parent.encoder,
        partitioning=parent.partitioning, parent_version=parent.version, change=change, change_detail=detail,
        build=parent.build, tombstones=tombstones, forget=forget,
        removed_count=tombstones.count if tombstones else 0,
    )


def read_id_file(path: str) -> list[str]:
    """Ids from a Parquet file with an ``id`` column, or a text file with one id per line."""
    if not storage.exists(path):
        raise FileNotFoundError(f"id file not found: {path}")
    if path.endswith(".parquet"):
        fs, p = storage.filesystem(path)
        with fs.open(p, "rb") as f:
            table = pq.read_table(f, columns=["id"])
        return [str(i) for i in table.column("id").to_pylist()]
    lines = storage.read_bytes(path).decode().splitlines()
    return [line.strip() for line in lines if line.strip()]


def _items(shard_dir: str, columns) -> dict:
    table = read_items_at(shard_dir, columns)
    return {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in columns}


def select_for_removal(items: dict, *, ids=None, label=None, source=None) -> np.ndarray:
    """Row mask of one shard's items matching exactly one of the removal selectors."""
    if sum(x is not None for x in (ids, label, source)) != 1:
        raise ValueError("give exactly one of ids, label or source to remove")
    if ids is not None:
        wanted = set(ids)
        return np.fromiter((i in wanted for i in items["id"]), dtype=bool, count=len(items["id"]))
    if label is not None:
        return items["label"].astype(np.int64) == int(label)
    return items["source"] == source


def remove_items(root: str, *, ids=None, label: str | None = None, source: str | None = None,
                 reason: str | None = None) -> dict:
    """Remove items from the latest version: publish a version that tombstones them and forgets them.

    Returns once the new manifest is written: every ``Memory.open`` from then on excludes the items
    (searches still return k neighbours), and ``add`` refuses their ids unless re-admitted. Ids given
    in ``ids`` that the memory does not hold are forgotten too (so they cannot be added later).

    Raises:
        ValueError: not exactly one selector, or an unknown class name.
        FileNotFoundError: no memory at ``root``.
    """
    t0 = time.perf_counter()
    parent = mf.read_manifest(root)
    label_index = None
    if label is not None:
        if label not in parent.class_names:
            raise ValueError(f"unknown class {label!r}; this memory's classes: {', '.join(parent.class_names)}")
        label_index = parent.class_names.index(label)
    how = f"ids ({len(ids)} given)" if ids is not None else f"label {label}" if label is not None else f"source {source}"
    reason = reason or f"removed by {how}"
    dead = removals.tombstones_by_shard(root, parent)
    pairs = [(s, i) for s, items in dead.items() for i in items]
    removed = []
    for entry in parent.shards:
        items = _items(storage.join(root, entry.path), ("id", "label", "source"))
        mask = select_for_removal(items, ids=ids, label=label_index, source=source)
        already = dead.get(entry.path, set())
        hits = [i for i in items["id"][mask] if i not in already]
        removed.extend(hits)
        pairs.extend((entry.path, i) for i in hits)
    version = next_version(root)
    forgotten = removals.forget_list(root, parent)
    rows = list(zip(forgotten.column("id").to_pylist(), forgotten.column("version").to_pylist(),
                    forgotten.column("reason").to_pylist()))
    new_forget = [str(i) for i in (ids if ids is not None else removed)]
    rows += [(i, version, reason) for i in new_forget]
    token = new_token()
    tomb = removals.write_table(root, removals.state_path(version, "tombstones.parquet", token),
                                removals.tombstones_table(pairs))
    forget = removals.write_table(root, removals.state_path(version, "forget.parquet", token),
                                  removals.forget_table(rows))
    not_found = sorted(set(ids) - set(removed)) if ids is not None else []
    detail = {"removed": len(removed), "by": how, "reason": reason, "not_found": len(not_found)}
    manifest = derive_manifest(parent, version=version, change="remove", detail=detail,
                               tombstones=tomb, forget=forget)
    mf.write_manifest(root, manifest)
    return {"memory": root, "version": version, "parent_version": parent.version, "removed": len(removed),
            "not_found": len(not_found), "not_found_examples": not_found[:5],
            "live_count": manifest.live_count, "seconds": time.perf_counter() - t0}


def plan_compaction(manifest: Manifest, dead_by_shard: dict, *, merge: bool = True) -> list[dict]:
    """Which shards to rewrite: ``[{partition, name, sources: [{entry: ShardEntry, dead: [ids]}]}]``.

    A partition is rewritten when one of its shards holds removed items, or (``merge``) when it is
    spread over several shards (``add`` writes new ones). Its rewritten shard takes the name a fresh
    build gives that partition, so a compacted memory looks like one built from scratch.
    """
    by_part: dict[int, list] = {}
    for entry in manifest.shards:
        by_part.setdefault(entry.partition_number, []).append(entry)
    groups = []
    for part, entries in sorted(by_part.items()):
        dirty = any(dead_by_shard.get(e.path) for e in entries)
        if dirty or (merge and len(entries) > 1):
            groups.append({"partition": part, "name": mf.shard_name(part, manifest.num_partitions),
                           "sources": [{"entry": e, "dead": sorted(dead_by_shard.get(e.path, ()))}
                                       for e in entries]})
    return groups


def compacted_manifest(parent: Manifest, groups: list, new_entries: list[ShardEntry], *, version: int,
                       detail: dict, tombstones: StateRef | None = None) -> Manifest:
    """The manifest after compaction: rewritten partitions replaced, their tombstones dropped.

    ``new_entries`` are the shard entries the job wrote (a partition whose items were all removed
    has none). ``tombstones``: the state entry holding the tombstones of shards not rewritten (the
    caller writes it), None when there are none.
    """
    replaced = {s["entry"].path for g in groups for s in g["sources"]}
    shards = [e for e in parent.shards if e.path not in replaced] + list(new_entries)
    shards.sort(key=lambda e: (e.partition_number, e.name))
    return derive_manifest(parent, version=version, change="compact", detail=detail, shards=shards,
                           tombstones=tombstones)


def version_history(root: str) -> list[dict]:
    """Every published version, oldest first, with what changed and the reader leases on it."""
    held = leases.held_versions(root)
    out = []
    for v in mf.list_versions(root):
        m = mf.read_manifest(root, v)
        out.append({
            "version": v, "parent_version": m.parent_version, "change": m.change,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created_unix)),
            "items": m.live_count, "removed_pending_compaction": m.removed_count or 0,
            "forgotten": m.forget.count if m.forget else 0, "shards": len(m.shards),
            "classes": len(m.class_names), "detail": m.change_detail or {}, "leased": v in held,
        })
    return out


def _version_of(dirname: str) -> int | None:
    m = _VERSION_DIR.match(dirname)
    return int(m.group(1)) if m else None


def collect_garbage(root: str, keep: int, *, dry_run: bool = False) -> dict:
    """Delete the files of all but the newest ``keep`` versions (never the latest, never a leased one).

    Manifests go first, so no reader can open a version whose files are going; then every shard
    folder and state file no kept version references. Leftovers of unfinished builds count as
    garbage once a version at least as new as theirs is published (before that they may belong to
    a build still running, and are reported as pending).
    """
    if keep < 1:
        raise ValueError(f"--keep must be >= 1 (the current version is always kept), got {keep}")
    versions = mf.list_versions(root)
    if not versions:
        raise FileNotFoundError(f"no memory at {root}")
    latest = versions[-1]
    held = leases.held_versions(root)
    kept = sorted(set(versions[-keep:]) | {v for v in versions if v in held} | {latest})
    refs = set()
    for v in kept:
        refs |= mf.read_manifest(root, v).referenced_paths()
    deleted_versions = [v for v in versions if v not in kept]
    if not dry_run:
        for v in deleted_versions:
            storage.remove(mf.manifest_path(root, v))
    deleted, pending = [], []
    for top in ("shards", "state"):
        for d in storage.list_names(storage.join(root, top)):
            dv = _version_of(d)
            children = storage.list_names(storage.join(root, top, d))
            doomed = [f"{top}/{d}/{c}" for c in children if f"{top}/{d}/{c}" not in refs]
            if not doomed:
                continue
            if dv is None or dv > latest:
                pending.extend(doomed)
                continue
            deleted.extend(doomed)
            if not dry_run:
                for rel in doomed:
                    storage.remove(storage.join(root, rel), recursive=True)
                if len(doomed) == len(children):
                    storage.remove(storage.join(root, top, d), recursive=True)
    return {"memory": root, "kept_versions": kept, "leased_versions": sorted(v for v in held if v in versions),
            "deleted_versions": deleted_versions, "deleted_paths": len(deleted), "pending_paths": pending,
            "dry_run": dry_run}
