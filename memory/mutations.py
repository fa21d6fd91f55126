"""Changing a memory: remove (unlearning), prune (tombstones only), plan compaction, list versions, collect garbage.

Every change publishes a new manifest version derived from its parent (``derive_manifest``) with
``memory.publishing`` (create-if-absent; re-derived from the new latest on a lost race); nothing
already published is modified, so a reader pinned to a version is never affected. Remove only
writes small state files and a manifest, so it is durable the moment it returns; the Beam jobs
(``pipelines.build`` for build and add, ``pipelines.compact``, ``pipelines.prune``) publish through the
same helpers.
Garbage collection lives in ``memory.garbage``.
"""
from __future__ import annotations

import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import leases, publishing, removals, storage
from memory import manifest as mf
from memory.garbage import collect_garbage
from memory.items import read_items_at
from memory.manifest import Manifest, ShardEntry, StateRef

__all__ = ["collect_garbage", "compacted_manifest", "derive_manifest", "new_token", "next_version",
           "plan_compaction", "prune_items", "read_id_file", "remove_items", "select_for_removal", "version_history"]


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
    """Ids from a Parquet file with an ``id`` column, or a text file with one id per line (blank
    lines skipped); repeats dropped, order kept.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a folder.
        ValueError: no ``id`` column, ids of another type or null, not UTF-8 text, or no ids at all.
    """
    fs, p = storage.filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"id file not found: {path}")
    if fs.isdir(p):
        raise IsADirectoryError(f"id file {path} is a folder (Is a directory): give a text file with one id "
                                "per line, or Parquet with an 'id' column")
    data = storage.read_bytes(path)
    ids = _parquet_ids(data, path) if path.endswith(".parquet") or data[:4] == b"PAR1" else _text_ids(data, path)
    if not ids:
        raise ValueError(f"id file {path} holds no ids: nothing to remove")
    return list(dict.fromkeys(ids))


def _parquet_ids(data: bytes, path: str) -> list[str]:
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        names = pf.schema_arrow.names
        if "id" not in names:
            raise ValueError(f"id file {path} has no 'id' column (its columns: {', '.join(names[:10]) or 'none'})")
        column = pf.read(columns=["id"]).column("id")
    except pa.ArrowException as exc:
        raise ValueError(f"id file {path} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_integer(column.type)):
        raise ValueError(f"id file {path}: column 'id' holds {column.type}, not strings or integers")
    ids = [str(i) for i in column.to_pylist() if i is not None]
    if column.null_count or "" in ids:
        raise ValueError(f"id file {path}: column 'id' has {column.null_count + ids.count('')} empty values")
    return ids


def _text_ids(data: bytes, path: str) -> list[str]:
    try:
        lines = data.decode().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"id file {path} is neither UTF-8 text (one id per line) nor Parquet") from None
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


def _checked_selector(ids, label, source):
    """The selector's ids as unique strings (None when another selector is given); bad selectors refused."""
    if sum(x is not None for x in (ids, label, source)) != 1:
        raise ValueError("give exactly one of ids, label or source to remove")
    for name, value in (("label", label), ("source", source)):
        if value is not None and not str(value).strip():
            raise ValueError(f"the {name} to remove is empty")
    if ids is None:
        return None
    if isinstance(ids, (str, bytes)):
        raise ValueError("ids must be a list of ids, not one string")
    ids = list(dict.fromkeys(str(i) for i in ids))
    if not ids:
        raise ValueError("no ids given (the list is empty): nothing to remove")
    if "" in ids:
        raise ValueError("an empty id cannot be removed")
    return ids


def _scan(root: str, parent: Manifest, ids, label_index, source) -> dict:
    """What a removal finds in ``parent``: live hits ``(shard, id)``, ids matched at all, sources seen."""
    dead = removals.tombstones_by_shard(root, parent)
    hits, matched, sources = [], set(), set()
    for entry in parent.shards:
        items = _items(storage.join(root, entry.path), ("id", "label", "source"))
        mask = select_for_removal(items, ids=ids, label=label_index, source=source)
        matched.update(items["id"][mask])
        if source is not None and len(sources) < 50:
            sources.update(str(s) for s in np.unique(items["source"].astype(str)))
        already = dead.get(entry.path, set())
        hits.extend((entry.path, i) for i in items["id"][mask] if i not in already)
    return {"dead": dead, "hits": hits, "matched": matched, "sources": sources}


def _removal(root: str, parent: Manifest, selector: dict, reason: str, how: str, token: str, out: dict, *,
             forget: bool = True, change: str = "remove", extra: dict | None = None):
    """The manifest that removes the selection from ``parent`` (None when ``parent`` already has it
    removed, and with ``forget`` forgotten); what it found goes in ``out``.

    ``selector``: exactly one of ``ids``, ``label`` (a class name) or ``source``. With ``forget`` every
    selected id joins the forget list (unlearning: ``add`` refuses it); without, the items are only
    tombstoned (pruning). ``change`` and ``extra`` go to the version's record.
    """
    ids, label, source = selector.get("ids"), selector.get("label"), selector.get("source")
    label_index = None
    if label is not None:
        if label not in parent.class_names:
            raise ValueError(f"unknown class {label!r}; this memory's classes: {', '.join(parent.class_names)}")
        label_index = parent.class_names.index(label)
    scan = _scan(root, parent, ids, label_index, source)
    if not scan["matched"] and ids is None:
        what = f"class {label!r}" if label is not None else f"source {source!r}"
        seen = f" (sources: {', '.join(sorted(scan['sources'])[:10])})" if source is not None else ""
        raise ValueError(f"no item of {root} has {what}: nothing to remove{seen}")
    forgotten = removals.forget_list(root, parent)
    known = set(forgotten.column("id").to_pylist())
    removed = [i for _, i in scan["hits"]]
    new_forget = [i for i in (ids if ids is not None else removed) if i not in known] if forget else []
    out.update(removed=removed, forgotten=new_forget, already=len(scan["matched"]) - len(removed),
               not_found=sorted(set(ids) - scan["matched"]) if ids is not None else [])
    if not removed and not new_forget:
        return None
    version = parent.version + 1
    pairs = [(s, i) for s, dead in scan["dead"].items() for i in dead] + scan["hits"]
    tomb = removals.write_table(root, removals.state_path(version, "tombstones.parquet", token),
                                removals.tombstones_table(pairs))
    forget_ref = "keep"
    if new_forget:
        rows = list(zip(forgotten.column("id").to_pylist(), forgotten.column("version").to_pylist(),
                        forgotten.column("reason").to_pylist())) + [(i, version, reason) for i in new_forget]
        forget_ref = removals.write_table(root, removals.state_path(version, "forget.parquet", token),
                                          removals.forget_table(rows))
    detail = {"removed": len(removed), "by": how, "reason": reason, "not_found": len(out["not_found"]),
              **(extra or {})}
    return derive_manifest(parent, version=version, change=change, detail=detail, tombstones=tomb, forget=forget_ref)


def remove_items(root: str, *, ids=None, label: str | None = None, source: str | None = None,
                 reason: str | None = None) -> dict:
    """Remove items from the latest version: publish a version that tombstones them and forgets them.

    Returns once the new manifest is published: every ``Memory.open`` from then on excludes the items
    (searches still return k neighbours), and ``add`` refuses their ids unless re-admitted. Ids given
    in ``ids`` that the memory does not hold are forgotten too (so they cannot be added later).
    Derived from the latest version; when another writer publishes first, derived again from the
    new latest (``memory.publishing``), so concurrent changes are all kept. When the latest version
    already has every selected item removed and forgotten, nothing is published (``changed`` False).

    Raises:
        ValueError: not exactly one selector, an empty id list, an unknown class, or a class or
            source no item has.
        FileNotFoundError: no memory at ``root``.
        ConcurrentUpdate: beaten by other writers on every try.
    """
    ids = _checked_selector(ids, label, source)
    how = (f"ids ({len(ids)} given)" if ids is not None
           else f"label {label}" if label is not None else f"source {source}")
    return _publish_removal(root, {"ids": ids, "label": label, "source": source}, reason or f"removed by {how}", how)


def prune_items(root: str, ids, *, detail: dict) -> dict:
    """Hard pruning: tombstone ``ids`` in a new version with the reason ``removals.PRUNED``, not forgetting them.

    The same removal as :func:`remove_items` (excluded from every later search, dropped by ``compact``,
    concurrent changes kept), recorded as ``change: "prune"`` with ``detail`` (the rule and its
    counts), and left off the forget list: pruning selects data, it is not unlearning, so ``add`` may
    bring such an id back. Ids already removed, or no longer held, publish nothing (``changed`` False).

    Raises:
        ValueError: an empty id list or an empty id.
    """
    ids = _checked_selector(ids, None, None)
    return _publish_removal(root, {"ids": ids}, removals.PRUNED, "prune", forget=False, change="prune",
                            extra=detail)


def _publish_removal(root: str, selector: dict, reason: str, how: str, **kind) -> dict:
    """Publish :func:`_removal` of ``selector`` on the latest version (derived again on a lost race); its summary."""
    t0 = time.perf_counter()
    token, found = new_token(), {}

    def derive(parent):
        return _removal(root, parent, selector, reason, how, token, found, **kind)

    what = f"{kind.get('change', 'remove')} from {root}"
    parent, manifest, tries = publishing.publish_derived(root, derive, what=what)
    current = manifest or parent
    return {"memory": root, "version": current.version, "parent_version": parent.version if manifest else None,
            "changed": manifest is not None, "removed": len(found["removed"]),
            "already_removed": found["already"], "forgotten": len(found["forgotten"]),
            "not_found": len(found["not_found"]), "not_found_examples": found["not_found"][:5],
            "live_count": current.live_count, "tries": tries, "seconds": time.perf_counter() - t0}


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
    """Every published version, oldest first, with what changed and the reader leases on it.

    Raises:
        FileNotFoundError: no memory at ``root``.
    """
    versions = mf.list_versions(root)
    if not versions:
        mf.read_manifest(root)  # raises the one "no memory" error
    held = leases.held_versions(root)
    out = []
    for v in versions:
        try:
            m = mf.read_manifest(root, v)
        except FileNotFoundError:
            continue  # collected by gc while we listed
        out.append({
            "version": v, "parent_version": m.parent_version, "change": m.change,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(m.created_unix)),
            "items": m.live_count, "removed_pending_compaction": m.removed_count or 0,
            "forgotten": m.forget.count if m.forget else 0, "shards": len(m.shards),
            "classes": len(m.class_names), "detail": m.change_detail or {}, "leased": v in held,
        })
    return out
