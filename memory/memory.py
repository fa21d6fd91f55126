"""The visual memory: write one in a single process, open a pinned version, search and classify.

``search`` fans every query batch out to all shards (each returns its own top-k), then merges the
lists into the global top-k: with the exact backend this equals one brute-force search over all
items, whatever the number of shards, equal similarities ordered by item id.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from memory import confidence, leases, quantize, removals, voting
from memory import manifest as mf
from memory.backends import BACKENDS
from memory.columns import ItemColumns
from memory.fanout import ThreadFanout
from memory.filters import ItemFilter
from memory.partition import Router, check_margin, check_routing, hash_partition
from memory.items import ItemPolicy, normalise
from memory.shard import DEFAULT_TARGET_RECALL, Shard, check_target_recall, write_shard
from memory.topk import first_cut, merge_keys, merge_with_refetch


@dataclasses.dataclass
class Neighbours:
    """The k nearest items of each query, best first. Padding (k > items) has label -1, id ''."""

    ids: np.ndarray      # (Q, k) object (str)
    labels: np.ndarray   # (Q, k) int64
    sims: np.ndarray     # (Q, k) float32 cosine similarity
    weights: np.ndarray  # (Q, k) float32 per-item vote multiplier (soft pruning)


@dataclasses.dataclass
class Classification:
    predictions: np.ndarray  # (Q,) class index, -1 when no neighbour could vote or the query abstained
    scores: np.ndarray       # (Q, C) class scores of the voting rule
    neighbours: Neighbours   # the neighbours behind each decision
    class_names: list
    confidence: np.ndarray   # (Q,) the voted class's share of the vote (memory.confidence), 0 when nothing voted
    reasons: np.ndarray      # (Q,) object: None (answered), "abstained" or "no votes" (why the prediction is -1)

    @property
    def predicted_names(self) -> list:
        return [self.class_names[p] if p >= 0 else None for p in self.predictions]

    @property
    def abstained(self) -> np.ndarray:
        """``(Q,)`` bool: the queries whose confidence fell below ``abstain_below``."""
        return self.reasons == confidence.ABSTAINED


def write_memory(path: str, embeddings, labels, ids, *, num_shards: int = 1, backend: str = "exact",
                 class_names, weights=None, provenance=None, encoder=None, backend_params=None,
                 storage: str = "float32", target_recall: float | None = DEFAULT_TARGET_RECALL,
                 tuning_queries=None, storage_dtype: str | None = None) -> mf.Manifest:
    """Write a new memory at ``path`` (local or ``gs://``) in this process; returns its manifest.

    Items are hash-partitioned by id into ``num_shards`` shards, each written with the per-shard
    writer the Beam build also uses. The manifest is written last: an interrupted write leaves no
    readable memory behind, never a partial one.

    Every item must pass ``ItemPolicy(dim, len(class_names), norm_tolerance=None)`` (any finite,
    non-zero norm; vectors are stored L2-normalised).

    ``storage`` is the storage mode (``memory.quantize.MODES``; ``storage_dtype`` is its older
    name). ``target_recall`` (None: defaults untuned) tunes each ScaNN shard's search settings to
    that recall@10 against brute force, measured on a sample of its own items and of
    ``tuning_queries`` (an optional ``(n, dim)`` array of real queries); ``memory.tuning``.

    Raises:
        ValueError: no items, mismatched lengths, an item the policy refuses (the first one named:
            duplicate or empty id, NaN/inf or zero vector, label outside ``class_names``, unknown
            ``label_source``), bad weights, an unknown backend or storage mode (``codes`` needs
            ScaNN), a target recall outside (0, 1], or a memory already at ``path``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    storage = quantize.check_mode(storage_dtype or storage, backend)
    check_target_recall(target_recall)
    if len(ids) == 0:
        raise ValueError("cannot write an empty memory: no items given")
    ids = np.asarray(ids, dtype=object)
    if not len(class_names):
        raise ValueError("a memory needs at least one class name")
    shape = np.shape(embeddings)
    policy = ItemPolicy(dim=shape[1] if len(shape) == 2 and shape[1] else 1, num_classes=len(class_names),
                        norm_tolerance=None)
    emb = policy.admit(ids, embeddings, labels, weights=weights,
                       label_sources=(provenance or {}).get("label_source"))
    if mf.latest_version(path) is not None:
        raise ValueError(f"a memory already exists at {path} (version {mf.latest_version(path)})")
    shard_of = hash_partition(ids, num_shards)
    version = 1
    shards = []
    for s in range(num_shards):
        rows = np.flatnonzero(shard_of == s)
        if len(rows) == 0:
            continue
        name = mf.shard_name(s, num_shards)
        shards.append(write_shard(
            path, mf.shard_dir(version, name), emb[rows], ids[rows], np.asarray(labels)[rows], name=name,
            backend_name=backend, weights=None if weights is None else np.asarray(weights)[rows],
            provenance={k: np.asarray(v)[rows] for k, v in (provenance or {}).items()},
            backend_params=backend_params, storage=storage, target_recall=target_recall,
            tuning_queries=tuning_queries,
        ))
    manifest = mf.Manifest.new(
        version=version, dim=emb.shape[1], class_names=class_names, backend=backend, shards=shards,
        encoder=encoder, partitioning=mf.Partitioning("hash", num_shards=num_shards),
    )
    mf.write_manifest(path, manifest)
    return manifest


class Memory:
    """An opened, pinned version of a memory. Use :meth:`open`."""

    def __init__(self, root: str, manifest: mf.Manifest, shards, executor, lease=None):
        self.root = root
        self.manifest = manifest  # the pinned version's
        self._router, self._router_of = None, None  # memory.partition.Router of self.manifest's partitioning
        self.shards = shards
        self.executor = executor
        self.lease = lease
        self.columns = ItemColumns(shards)  # ids, labels, weights by key, gathered once per search

    @classmethod
    def open(cls, path: str, version: int | None = None, *, verify: bool = True, executor=None,
             cache_dir: str | None = None, lease_s: float | None = None, hosts: str = "local") -> "Memory":
        """Open ``version`` (default: the latest) of the memory at ``path``, checking every checksum.

        Items the version records as removed (``memory.removals``) are excluded from every search,
        which still returns k live neighbours: ScaNN shards delete them from their loaded searcher
        (this open's copy only; the files and other opens keep them), exact shards skip them
        (``Shard.exclude``).

        Args:
            executor: how shards are searched (default: a thread per core); see ``memory.fanout``.
            verify: check file checksums (sizes are always checked).
            lease_s: hold a lease on the version for this many seconds (released by :meth:`close`),
                so ``vismem gc`` keeps its files while this reader may still need them.
            hosts: ``local`` loads every shard in this process; ``ray`` hosts each shard in a Ray
                actor of the connected cluster (``ray.init`` first) for memories larger than one
                machine. Search results are identical either way.

        Raises:
            FileNotFoundError: nothing published at ``path``, or no such version.
            MemoryFormatError: a corrupt or partial memory, or an unsupported format version.
        """
        manifest = mf.read_manifest(path, version)
        entries = manifest.shards
        lease = leases.acquire(path, manifest.version, lease_s) if lease_s else None
        try:
            if hosts == "local":
                shards = [Shard.open(path, e, verify=verify, cache_dir=cache_dir) for e in entries]
            elif hosts == "ray":
                from memory.ray_shards import open_remote_shards

                shards = open_remote_shards(path, entries, verify=verify)
            else:
                raise ValueError(f"hosts must be 'local' or 'ray', got {hosts!r}")
            removed = removals.tombstones_by_shard(path, manifest)
            for shard in shards:
                shard.exclude(removed.get(shard.entry.path, ()))
        except BaseException:
            if lease:
                leases.release(lease)
            raise
        # Local shards: one thread per core at most, each shard search is itself multi-threaded (BLAS,
        # ScaNN). Ray-hosted shards: one waiting thread per shard, the work happens in the actors.
        threads = len(shards) if hosts == "ray" else min(len(shards) or 1, os.cpu_count() or 1)
        return cls(path, manifest, shards, executor or ThreadFanout(max(threads, 1)), lease)

    def close(self):
        self.executor.close()
        if self.lease:
            leases.release(self.lease)
            self.lease = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def class_names(self) -> list:
        return self.manifest.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        """Live items (removed ones not counted)."""
        return sum(s.live_count for s in self.shards)

    def _queries(self, queries, k) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}) for this memory, got {np.shape(queries)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if len(self) == 0:
            raise ValueError(f"memory {self.root} (version {self.version}) is empty: nothing to search")
        return normalise(q, what="queries")

    def search(self, queries, k: int, *, leaves_to_search: int | None = None,
               reorder: int | None = None, probe_shards: int | None = None, probe_margin: float | None = None,
               where=None) -> Neighbours:
        """The global top-k neighbours of each query over all shards, best first.

        ``leaves_to_search`` and ``reorder`` override each ScaNN shard's build-time settings (trading
        recall for speed); the exact backend ignores them. ``probe_shards=P`` on a k-means
        partitioned memory searches each query only in the ``P`` partitions nearest to it, a
        partition's distance being that of its most similar k-means cell (all shards when ``P``
        covers every partition). ``probe_margin=m`` visits the second to ``P``-th nearest partitions
        (every partition without ``P``) only where their similarity is within ``m`` of the nearest
        one's (``memory.partition.check_margin``). ``where`` (a ``memory.filters.ItemFilter``) restricts the search to
        the items it allows, inside each shard: each query still gets its k nearest allowed items
        (padding only when fewer exist).

        Raises:
            ValueError: wrong dimension, NaN/inf or zero queries, k < 1, an empty memory, or
                ``probe_shards`` or ``probe_margin`` on a memory without centroids, a negative
                ``probe_margin``.
        """
        q = self._queries(queries, k)
        knobs = {key: v for key, v in (("leaves_to_search", leaves_to_search), ("reorder", reorder)) if v}
        if where is not None:  # travels with the knobs to every shard, local or Ray-hosted
            if not isinstance(where, ItemFilter):
                raise ValueError(f"where must be a memory.filters.ItemFilter (ItemFilter.of / parse), got {where!r}")
            knobs["where"] = where
        route = self._route(q, probe_shards, check_margin(probe_margin))
        if route is None:
            sims, keys = self._search_all(q, k, knobs)
        else:
            sims, keys = self._search_routed(q, k, route, knobs)
        ids, labels, weights = self.columns.take(keys)
        return Neighbours(ids=ids, labels=labels, sims=sims, weights=weights)

    def _search_all(self, q, k, knobs):
        """Every shard searches every query; ``(sims, keys)`` merged on numbers.

        Exact hash shards are first asked for ``first_cut(k, shards)`` each (29 of k = 100 over 8),
        and again for k only where a shard may hold more of a query's top k: the same answer,
        with less top-k work in every shard (``memory.topk.merge_with_refetch``).
        """
        items = list(enumerate(self.shards))
        cut = k
        if len(items) > 1 and self.manifest.partitioning.method == "hash" and all(
                s.entry.backend == "exact" for s in self.shards):
            cut = first_cut(k, len(items))
        results = self.executor.map(lambda item: self._search_shard(*item, q, cut, knobs), items)
        if len(results) == 1:
            return results[0]
        if cut == k:
            return merge_keys(results, k, self.columns.ids_of)
        return merge_with_refetch(
            results, k, lambda i, rows: self._search_shard(i, self.shards[i], q[rows], k, knobs),
            self.columns.ids_of, self.executor.map)

    def _search_shard(self, index, shard, q, k, knobs):
        """``(sims, keys)`` ``(Q, k)`` of one shard's top-k, best first (keys: ``self.columns``)."""
        sims, rows = shard.search_rows(q, k, **knobs)
        return sims, self.columns.keys(index, rows)

    def _route(self, q, probe_shards, margin=None):
        """``(Q, P)`` partitions each query visits, nearest first (-1: a slot the margin skips), or None
        to visit every shard."""
        if probe_shards is None and margin is None:
            return None
        if probe_shards is not None and (isinstance(probe_shards, bool) or
                                         not isinstance(probe_shards, (int, np.integer)) or probe_shards < 1):
            raise ValueError(f"probe_shards must be an integer >= 1, got {probe_shards!r}")
        part = self.manifest.partitioning
        check_routing(part, probe_shards, margin, self.root)
        if probe_shards is None:  # a margin alone: every partition within it
            probe_shards = len(self.shards)
        cells = part.cell_partitions
        if probe_shards >= (max(cells) + 1 if cells else len(part.centroids)) and margin is None:
            return None
        if self._router_of is not part:  # one router per partitioning (manifests are replaced, not edited)
            self._router, self._router_of = Router(part.centroids, cells), part
        return self._router(q, probe_shards, margin)

    def _search_routed(self, q, k, route, knobs):
        """Each shard searches only the queries routed to its partition; one merge at the end.

        A query's candidates sit in ``P * m`` blocks of ``k`` (``m``: the most shards one partition
        has, as ``add`` can spread a partition over several): block ``slot * m + j`` holds the list
        of the ``j``-th shard of its ``slot``-th partition. With one block (``P = 1``, one shard per
        partition) every query's list is final as its shard returned it: no merge at all.
        """
        q_num, probe = route.shape
        within, seen = [], {}
        for shard in self.shards:  # each shard's place among its partition's shards
            p = shard.entry.partition_number
            within.append(seen.get(p, 0))
            seen[p] = within[-1] + 1
        m = max(seen.values(), default=1)
        sims = np.full((q_num, probe * m * k), -np.inf, np.float32)
        keys = np.full((q_num, probe * m * k), -1, np.int64)
        # (query, slot) pairs grouped by partition with one sort: a compare over every pair per
        # shard cost more than a small shard's search at 128 shards.
        flat = route.ravel()
        order = np.argsort(flat, kind="stable")  # stable: each partition's queries stay ascending; skipped
        # slots (-1, a probe margin's) sort first and belong to no partition's range
        bounds = np.searchsorted(flat[order], np.arange(int(flat.max()) + 2))

        def one(item):
            index, shard = item
            p = shard.entry.partition_number
            pairs = order[bounds[p]:bounds[p + 1]] if p < len(bounds) - 1 else order[:0]
            if not len(pairs):
                return None
            sel = pairs // probe  # a query visits a partition at most once
            return (sel, pairs % probe, within[index], *self._search_shard(index, shard, q[sel], k, knobs))

        cols = np.arange(k)
        for res in self.executor.map(one, list(enumerate(self.shards))):
            if res is not None:
                sel, slot, j, s, kk = res
                at = (slot[:, None] * m + j) * k + cols[None, :]  # each shard pads its lists to k
                sims[sel[:, None], at], keys[sel[:, None], at] = s, kk
        if probe * m == 1:
            return sims, keys
        return merge_keys([(sims, keys)], k, self.columns.ids_of)

    def classify(self, queries, k: int = 50, method: str = "rank", *, use_weights: bool = True,
                 alpha: float = 2.0, tau: float = 0.07, xi: float = 1.0,
                 probe_shards: int | None = None, probe_margin: float | None = None, ties: str = "nearest",
                 abstain_below: float | None = None, where=None) -> Classification:
        """Classify queries by their k nearest neighbours and a voting rule (``memory.voting``).

        ``ties`` settles a tied top score (``nearest`` or ``leader``, ``memory.voting.TIES``). Each
        prediction carries its confidence, the voted class's share of the vote (``memory.confidence``);
        with ``abstain_below=C`` a prediction whose confidence is below C becomes -1, its reason
        ``"abstained"``. ``where`` votes with the nearest items a ``memory.filters.ItemFilter`` allows
        (:meth:`search`).

        Raises:
            ValueError: an unknown method or tie rule, ``abstain_below`` outside [0, 1], or bad queries
                or k (:meth:`search`).
        """
        if method not in voting.METHODS:
            raise ValueError(f"unknown voting method {method!r}; choose one of {', '.join(voting.METHODS)}")
        voting.check_ties(ties)
        confidence.check_abstain_below(abstain_below)
        nb = self.search(queries, k, probe_shards=probe_shards, probe_margin=probe_margin, where=where)
        kw = dict(method=method, num_classes=self.num_classes, weights=nb.weights if use_weights else None,
                  alpha=alpha, tau=tau, xi=xi, ties=ties)
        scores, voted = voting.vote_and_predict(nb.labels, nb.sims, **kw)
        conf = confidence.confidence(scores, voted)
        preds, reasons = confidence.abstain(voted, conf, abstain_below)
        return Classification(predictions=preds, scores=scores, neighbours=nb, class_names=self.class_names,
                              confidence=conf, reasons=reasons)
