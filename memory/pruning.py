"""Memory pruning as a memory operation (section 3.5, Appendix G): count wrong contributions, publish a pruned version.

Counting. Every live item is queried against the memory it is in; its own match is left out (by id)
and the first ``self_k`` other neighbours count: each one whose label differs from the query's gains
one wrong contribution. ``v`` of an item is the sum over every query. The work splits by shard:
:func:`self_query_counts` is the pure core for one shard's items (any search callable in, partial
``(ids, counts)`` out), :func:`sum_counts` adds partial counts per id. The Beam job
(``pipelines.prune``, ``vismem prune``) runs the core on workers, one shard at a time;
:func:`count_wrong` runs it in this process (the experiments). Both equal ``eval.pruning``'s
in-process count over one search of every item.

Publishing, as the next version (compare-and-swap, ``memory.publishing``), from a :class:`Rule`:

- hard: every item with ``v >= threshold`` is tombstoned with the reason ``removals.PRUNED`` and not
  forgotten (``memory.mutations.prune_items``): searches skip it, ``compact`` drops its row, ``add``
  may bring its id back.
- soft: every live item's ``weight`` (the vote multiplier in its shard's items table) becomes
  ``gamma = dd / (c + v)`` (1 where ``v = 0``). Each shard whose weights change is published again
  as a new folder holding the new ``items.parquet`` and the shard's other files unchanged (hard
  links locally, server-side copies on ``gs://``; :func:`reweighted_shard`), so the index is never
  rebuilt or downloaded, and every reader (local and Ray-hosted shards, serving, ``add``,
  ``compact``, ``gc``) keeps working unchanged: they all take weights from items tables. Weights
  are set, not multiplied, so pruning again with the same parameters publishes nothing.

The version records ``change: "prune"`` and a ``change_detail`` with the rule, ``self_k``,
``probe_shards``, the counts and what changed (``vismem versions`` lists it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import leases, mutations, publishing, removals, storage
from memory import manifest as mf
from memory.items import ITEMS_FILE, read_items
from memory.manifest import ConcurrentUpdate, Manifest, ShardEntry
from memory.memory import Memory
from memory.shard import read_vectors

BATCH = 2048  # self-queries per search call: (BATCH, self_k + 1) neighbour lists at a time
MODES = ("hard", "soft")


def soft_weights(v, *, c: float = 1.0, dd: float = 1.75) -> np.ndarray:
    """Soft-pruning vote multipliers: ``dd / (c + v)`` where ``v > 0``, else 1."""
    v = np.asarray(v, dtype=np.float64)
    if np.any(v < 0):
        raise ValueError("wrong-contribution counts must be >= 0")
    return np.divide(dd, c + v, out=np.ones_like(v), where=v > 0)


def hard_keep(v, threshold: int) -> np.ndarray:
    """Mask of items hard pruning keeps: ``v < threshold``."""
    return np.asarray(v) < threshold


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What pruning does with ``v``: ``hard`` removes ``v >= threshold``; ``soft`` weights by ``dd / (c + v)``.

    Raises:
        ValueError: an unknown mode, a threshold that is not an integer >= 1, ``c < 0`` or ``dd <= 0``.
    """

    mode: str
    threshold: int | None = None
    c: float = 1.0
    dd: float = 1.75

    def __post_init__(self):
        if self.mode == "hard":
            if not _whole(self.threshold) or self.threshold < 1:
                raise ValueError(f"the hard-pruning threshold must be an integer >= 1 (items with v >= it are "
                                 f"removed), got {self.threshold!r}")
        elif self.mode == "soft":
            for name, value, least in (("c", self.c, ">= 0"), ("dd", self.dd, "> 0")):
                number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if not number or value < 0 or (name == "dd" and value == 0):
                    raise ValueError(f"soft pruning's {name} (gamma = dd / (c + v)) must be a finite number {least}, "
                                     f"got {value!r}")
        else:
            raise ValueError(f"unknown pruning mode {self.mode!r}; choose one of {', '.join(MODES)}")

    @classmethod
    def hard(cls, threshold: int) -> "Rule":
        return cls("hard", threshold=threshold)

    @classmethod
    def soft(cls, c: float = 1.0, dd: float = 1.75) -> "Rule":
        return cls("soft", c=float(c), dd=float(dd))

    def params(self) -> dict:
        """The rule's parameters, as the version records them."""
        if self.mode == "hard":
            return {"mode": "hard", "threshold": int(self.threshold)}
        return {"mode": "soft", "c": self.c, "dd": self.dd}


def check_self_k(self_k) -> int:
    if not _whole(self_k) or self_k < 1:
        raise ValueError(f"self_k (neighbours per self-query that count) must be an integer >= 1, got {self_k!r}")
    return int(self_k)


def check_request(root: str, manifest: Manifest, self_k: int, probe_shards: int | None) -> None:
    """Refuse, before any work, a count that cannot run on ``manifest``'s version.

    Raises:
        ValueError: ``self_k`` not an integer >= 1, ``self_k`` at least the live items (no item would
            have ``self_k`` others), or ``probe_shards`` not >= 1 or on a memory without k-means centroids.
    """
    check_self_k(self_k)
    live = manifest.live_count
    if self_k >= live:
        raise ValueError(f"memory {root} (version {manifest.version}) has {live} live items: self-k {self_k} needs "
                         f"at least {self_k + 1} (each item's {self_k} nearest others)")
    if probe_shards is not None:
        if not _whole(probe_shards) or probe_shards < 1:
            raise ValueError(f"probe_shards must be an integer >= 1, got {probe_shards!r}")
        if not manifest.partitioning.centroids:
            raise ValueError(f"probe_shards needs a k-means partitioned memory (vismem build --partition kmeans); "
                             f"{root} is partitioned by {manifest.partitioning.method!r}")


# ---- counting: the pure core ----------------------------------------------------------------------------

def block_counts(query_ids, query_labels, neighbour_ids, neighbour_labels, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Partial ``v`` of one block of self-queries: ``(ids, counts)``, ids sorted, counts > 0.

    ``neighbour_ids`` / ``neighbour_labels`` ``(Q, K')`` are each query's neighbours, best first, from a
    search at ``K' >= k + 1``; the query's own id is dropped and the first ``k`` others count.
    Padding (id ``''``) and unlabelled neighbours (label < 0) never count.
    """
    query_ids = np.asarray(query_ids).astype(str)
    nb_ids = np.asarray(neighbour_ids).astype(str)
    nb_labels = np.asarray(neighbour_labels)
    if nb_ids.shape != nb_labels.shape or nb_ids.shape[0] != len(query_ids):
        raise ValueError("neighbour ids and labels must be (Q, K) for the Q queries")
    if nb_ids.shape[1] < k + 1:
        raise ValueError(f"search at least k + 1 = {k + 1} neighbours so the self-match can be dropped")
    order = np.argsort(nb_ids == query_ids[:, None], axis=1, kind="stable")[:, :k]  # non-self first, in rank order
    ids = np.take_along_axis(nb_ids, order, axis=1)
    labels = np.take_along_axis(nb_labels, order, axis=1)
    wrong = (labels != np.asarray(query_labels)[:, None]) & (labels >= 0) & (ids != "")
    uniq, counts = np.unique(ids[wrong], return_counts=True)
    return uniq.astype(object), counts.astype(np.int64)


def sum_counts(parts) -> tuple[np.ndarray, np.ndarray]:
    """Partial ``(ids, counts)`` summed per id: ``(ids sorted, counts)``."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, dtype=object), np.zeros(0, np.int64)
    ids = np.concatenate([np.asarray(p[0]).astype(str) for p in parts])
    counts = np.concatenate([np.asarray(p[1], np.int64) for p in parts])
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq.astype(object), np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)


def self_query_counts(ids, labels, vectors, search, k: int, *, batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """One shard's partial ``v``: its items queried against the memory, self-matches dropped by id.

    ``search(queries, kk)`` returns ``(neighbour ids, neighbour labels)`` ``(Q, kk)`` best first
    (e.g. :func:`memory_search`). Returns ``(ids, counts)`` of the neighbours that were wrong, summed.
    """
    ids, labels, vectors = np.asarray(ids, dtype=object), np.asarray(labels), np.asarray(vectors)
    parts = []
    for start in range(0, len(ids), batch):
        rows = slice(start, start + batch)
        nb_ids, nb_labels = search(vectors[rows], k + 1)
        parts.append(block_counts(ids[rows], labels[rows], nb_ids, nb_labels, k))
    return sum_counts(parts)


@dataclasses.dataclass(frozen=True)
class WrongCounts:
    """``v`` of a version's live items: ``ids`` (sorted) with ``v > 0``; every other live item has ``v = 0``."""

    ids: np.ndarray
    v: np.ndarray
    version: int  # the version counted
    items: int    # live items queried

    def of(self, ids) -> np.ndarray:
        """``v`` of each of ``ids`` (0 for an id not counted)."""
        ids = np.asarray(ids).astype(str)
        if not len(self.ids):
            return np.zeros(len(ids), np.int64)
        known = self.ids.astype(str)
        at = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        return np.where(known[at] == ids, self.v[at], 0).astype(np.int64)

    def summary(self) -> dict:
        return {"counted_version": self.version, "items_queried": self.items,
                "items_with_wrong": int(len(self.ids)), "wrong_votes": int(self.v.sum()),
                "v_max": int(self.v.max()) if len(self.v) else 0}


# ---- counting: reading a shard, searching the memory --------------------------------------------------

def shard_queries(root: str, entry: ShardEntry, dead=()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, labels, vectors)`` of a shard's live items (``dead``: its removed ids), vectors as stored, decoded."""
    table = read_items(root, entry, ["id", "label"])
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy().astype(np.int64)
    rows = np.arange(len(ids))
    if dead:
        gone = set(dead)
        rows = np.flatnonzero(np.fromiter((i not in gone for i in ids), dtype=bool, count=len(ids)))
    return ids[rows], labels[rows], read_vectors(root, entry, rows)


def memory_search(memory: Memory, probe_shards: int | None = None):
    """A ``search(queries, kk) -> (ids, labels)`` over an opened memory (routed when ``probe_shards``)."""
    def search(queries, kk):
        nb = memory.search(queries, kk, probe_shards=probe_shards)
        return nb.ids, nb.labels
    return search


def count_wrong(root: str, *, self_k: int, probe_shards: int | None = None, version: int | None = None) -> WrongCounts:
    """``v`` of every live item of ``version`` (default latest), counted shard by shard in this process.

    Raises:
        ValueError: see :func:`check_request`.
    """
    manifest = mf.read_manifest(root, version)
    check_request(root, manifest, self_k, probe_shards)
    dead = removals.tombstones_by_shard(root, manifest)
    parts, items = [], 0
    with Memory.open(root, manifest.version) as memory:
        search = memory_search(memory, probe_shards)
        for entry in manifest.shards:
            ids, labels, vectors = shard_queries(root, entry, dead.get(entry.path, ()))
            parts.append(self_query_counts(ids, labels, vectors, search, self_k))
            items += len(ids)
    return WrongCounts(*sum_counts(parts), version=manifest.version, items=items)


# ---- publishing -----------------------------------------------------------------------------------------

def record(rule: Rule, counts: WrongCounts, *, self_k: int, probe_shards: int | None, engine: str, token: str) -> dict:
    """What the version records about a prune (``change_detail``)."""
    return {**rule.params(), "self_k": int(self_k), "probe_shards": probe_shards, **counts.summary(),
            "engine": engine, "token": token}


def publish_hard(root: str, counts: WrongCounts, rule: Rule, detail: dict) -> dict:
    """Tombstone every item with ``v >= threshold`` in a new version (``mutations.prune_items``); its summary.

    Nothing is published (``changed`` False) when no item reaches the threshold or all are removed already.
    """
    pruned = counts.ids[~hard_keep(counts.v, rule.threshold)]
    if not len(pruned):
        latest = mf.read_manifest(root)
        return {"memory": root, "version": latest.version, "parent_version": None, "changed": False, "removed": 0,
                "live_count": latest.live_count}
    return mutations.prune_items(root, list(pruned), detail={**detail, "pruned": int(len(pruned))})


def reweighted_shard(root: str, entry: ShardEntry, counts: WrongCounts, rule: Rule, dead, *, version: int,
                     token: str) -> ShardEntry | None:
    """``entry`` published again with its live items' weights set to ``gamma(v)``; None when none changes.

    The new folder (``shards/vVERSION.TOKEN/NAME.ATTEMPT``) holds the new ``items.parquet`` and the
    shard's other files unchanged (``storage.clone_dir``); rows keep their order, so the index still
    matches. Removed items (``dead``) keep their weight.
    """
    table = read_items(root, entry)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    old = table.column("weight").to_numpy().astype(np.float32)
    live = np.ones(len(ids), bool)
    if dead:
        gone = set(dead)
        live = np.fromiter((i not in gone for i in ids), dtype=bool, count=len(ids))
    new = old.copy()
    new[live] = soft_weights(counts.of(ids[live]), c=rule.c, dd=rule.dd).astype(np.float32)
    if np.array_equal(new, old):
        return None
    at = table.schema.get_field_index("weight")
    table = table.set_column(at, table.schema.field(at), pa.array(new, pa.float32()))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    rel = mf.shard_dir(version, entry.name, token=token, attempt=uuid.uuid4().hex[:8])
    storage.clone_dir(storage.join(root, entry.path), storage.join(root, rel),
                      [f for f in entry.files if f != ITEMS_FILE], {ITEMS_FILE: data})
    files = {**entry.files, ITEMS_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    return dataclasses.replace(entry, path=rel, files=dict(sorted(files.items())))


def soft_version(root: str, latest: Manifest, parent_version: int, rewritten: dict, *, token: str,
                 detail: dict) -> Manifest:
    """The soft-pruned version on top of ``latest`` (the version counted, or one published meanwhile).

    ``rewritten``: ``{old shard path: its reweighted ShardEntry}``. Shards other writers added meanwhile
    are kept (weight 1: they were not counted); removals on a rewritten shard move to its new path.

    Raises:
        ConcurrentUpdate: ``latest`` no longer holds a rewritten shard (a compaction or another prune
            replaced it): run prune again.
    """
    lost = sorted(set(rewritten) - {e.path for e in latest.shards})
    if lost:
        raise ConcurrentUpdate(root, latest.version, f"a change that rewrote shard {lost[0]} ({len(lost)} of the "
                               "shards this prune reweighted); run prune again")
    version = latest.version + 1
    old = removals.tombstones(root, latest)
    shard_col = old.column("shard").to_pylist()
    tombstones = "keep"
    if any(s in rewritten for s in shard_col):
        moved = [rewritten[s].path if s in rewritten else s for s in shard_col]
        pairs = list(zip(moved, old.column("id").to_pylist()))
        tombstones = removals.write_table(root, removals.state_path(version, "tombstones.parquet", token),
                                          removals.tombstones_table(pairs))
    detail = {**detail, "reweighted_shards": len(rewritten)}
    if latest.version != parent_version:
        detail["rebased"] = {"from": parent_version, "onto": latest.version}
    return mutations.derive_manifest(latest, version=version, change="prune", detail=detail,
                                     shards=[rewritten.get(e.path, e) for e in latest.shards], tombstones=tombstones)


def publish_soft(root: str, parent_version: int, rewritten: dict, *, token: str, detail: dict) -> Manifest | None:
    """Publish :func:`soft_version` (re-derived on a lost race); None, publishing nothing, when no shard changed."""
    if not rewritten:
        return None
    _, manifest, _ = publishing.publish_derived(
        root, lambda latest: soft_version(root, latest, parent_version, rewritten, token=token, detail=detail),
        what=f"prune of {root}")
    return manifest


def prune_in_process(root: str, rule: Rule, *, self_k: int, probe_shards: int | None = None,
                     counts: WrongCounts | None = None) -> dict:
    """Prune the latest version in this process: count (or use ``counts``), then publish as the rule says.

    The same cores and the same publishing as ``pipelines.prune`` (``vismem prune``), for memories
    that fit one process (the experiments). ``counts`` from :func:`count_wrong` can be reused, so
    several rules apply one count; they may be of an earlier version: hard pruning finds the ids in
    the latest, soft pruning rebases onto it.

    Raises:
        ValueError: a bad rule or request (:class:`Rule`, :func:`check_request`).
        ConcurrentUpdate: see :func:`soft_version`.
    """
    token = mutations.new_token()
    with leases.writer_lease(root, token, holder="prune (in process)") as parent:
        if counts is None:
            counts = count_wrong(root, self_k=self_k, probe_shards=probe_shards, version=parent.version)
        detail = record(rule, counts, self_k=self_k, probe_shards=probe_shards, engine="in-process", token=token)
        if rule.mode == "hard":
            return {**publish_hard(root, counts, rule, detail), **counts.summary()}
        counted = mf.read_manifest(root, counts.version)
        dead = removals.tombstones_by_shard(root, counted)
        rewritten = {}
        for entry in counted.shards:
            new = reweighted_shard(root, entry, counts, rule, dead.get(entry.path, ()),
                                   version=parent.version + 1, token=token)
            if new is not None:
                rewritten[entry.path] = new
        manifest = publish_soft(root, counts.version, rewritten, token=token, detail=detail)
    current = manifest or mf.read_manifest(root)
    return {"memory": root, "version": current.version, "changed": manifest is not None,
            "reweighted_shards": len(rewritten), "live_count": current.live_count, **counts.summary()}
