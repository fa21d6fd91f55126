"""Garbage collection (``vismem gc``): delete the files no kept version uses, never those a writer needs.

Kept: the newest ``keep`` versions, the latest, every version with a reader lease. Deleted: the
other versions (retired: their manifests shrink to stubs, see ``manifest.retire``), then every shard folder and state file no kept version references. Writers run
meanwhile, so before deleting manifests and again before deleting files the versions and leases
are read again: a version published meanwhile keeps what it references, a writer lease keeps its
parent version and its folders (``leases.writer_lease``). Leftovers of unfinished builds count as
garbage once a version at least as new as theirs is published and no writer holds them. Lease
files that hold nothing any more (expired, or of a writer that is gone) are deleted too.
"""
from __future__ import annotations

import re

from memory import leases, storage
from memory import manifest as mf

_VERSION_DIR = re.compile(r"^v(\d{8})(?:\.(.+))?$")
TOPS = ("shards", "state")


def _dir_parts(dirname: str) -> tuple[int | None, str | None]:
    m = _VERSION_DIR.match(dirname)
    return (int(m.group(1)), m.group(2)) if m else (None, None)


def _refs(root: str, versions) -> set[str]:
    refs = set()
    for v in versions:
        try:
            refs |= mf.read_manifest(root, v).referenced_paths()
        except FileNotFoundError:
            continue  # another gc took it
    return refs


def _unreferenced(root: str, refs: set, latest: int) -> tuple[dict, list]:
    """``({(top, dir): [doomed paths]}, pending paths)``: folders' children no kept version uses."""
    doomed, pending = {}, []
    for top in TOPS:
        for d in storage.list_names(storage.join(root, top)):
            children = [f"{top}/{d}/{c}" for c in storage.list_names(storage.join(root, top, d))]
            unused = [rel for rel in children if rel not in refs]
            if not unused:
                continue
            version, _ = _dir_parts(d)
            if version is None or version > latest:  # may belong to a build still running
                pending.extend(unused)
            else:
                doomed[(top, d)] = (unused, len(children))
    return doomed, pending


def _recheck(root: str, latest: int, kept: set, refs: set) -> tuple[set, set, set]:
    """Versions and leases read again: ``(kept, refs, writer tokens)`` grown by what writers did meanwhile."""
    now = set(mf.list_versions(root))
    held = set(leases.held_versions(root)) & now
    grown = {v for v in now if v > latest} | (held - kept)
    return kept | held, refs | _refs(root, grown), leases.held_tokens(root)


def _spared(doomed: dict, refs: set, tokens: set) -> dict:
    out = {}
    for (top, d), (unused, total) in doomed.items():
        if _dir_parts(d)[1] in tokens:
            continue  # a writer is still writing there
        left = [rel for rel in unused if rel not in refs]
        if left:
            out[(top, d)] = (left, total)
    return out


def collect_garbage(root: str, keep: int, *, dry_run: bool = False) -> dict:
    """Delete the files of all but the newest ``keep`` versions (never the latest, never a leased one,
    never a file a version published meanwhile or a running writer uses).

    Raises:
        ValueError: ``keep`` is not an integer >= 1.
        FileNotFoundError: no memory at ``root``.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"--keep must be >= 1 (a whole number; the current version is always kept), got {keep!r}")
    versions = mf.list_versions(root)
    if not versions:
        mf.read_manifest(root)  # raises the one "no memory" error
    latest = versions[-1]
    kept = set(versions[-keep:]) | set(leases.held_versions(root)) & set(versions) | {latest}
    refs = _refs(root, kept)
    doomed, pending = _unreferenced(root, refs, latest)
    kept, refs, tokens = _recheck(root, latest, kept, refs)
    doomed = _spared(doomed, refs, tokens)
    gone_versions, pruned = [v for v in versions if v not in kept], 0
    if not dry_run:
        for v in gone_versions:
            mf.retire(root, v)
        kept, refs, tokens = _recheck(root, latest, kept, refs)  # published or leased while we deleted
        doomed = _spared(doomed, refs, tokens)
        for (top, d), (unused, total) in doomed.items():
            for rel in unused:
                storage.remove(storage.join(root, rel), recursive=True)
            if len(unused) == total:
                storage.remove(storage.join(root, top, d), recursive=True)
        pruned = leases.prune(root)
    held = leases.held_versions(root)
    return {"memory": root, "kept_versions": sorted(kept), "leased_versions": sorted(v for v in held if v in versions),
            "deleted_versions": gone_versions, "deleted_paths": sum(len(u) for u, _ in doomed.values()),
            "pending_paths": pending, "expired_leases_deleted": pruned, "dry_run": dry_run}
