"""The Beam pruning job (``vismem prune``): count wrong contributions shard by shard, publish a pruned version.

    shards ─► CountShard ─► (bucket, partial counts file) ─► GroupByKey ─► SumBucket ─► totals files
                                                                                          │ (side input)
    hard: ─────────────────────────────────────────────────────────────────────────────► PublishHard
    soft: shards ─► Reweight (a new folder per shard whose weights change) ─► ToList ─► PublishSoft

CountShard opens the memory once per worker (``setup``; heavy state is built on the worker, never
shipped), then for each shard it is given reads that shard's live items and their stored vectors
and runs ``memory.pruning.self_query_counts`` against the whole memory (routed with
``probe_shards`` on a k-means memory). Its partial counts go to staging files, split by id-hash
bucket; only paths cross the shuffle (``pipelines.build_stage``'s reason: the DirectRunner holds
whatever it groups in one process). SumBucket adds each bucket's partials per id (every id meets
in one bucket). The last step publishes with ``memory.pruning`` (compare-and-swap, found again by
the run's token when a runner retries it) and writes the run's record for the driver.

Why Beam and not Ray: the job is one pass over a fixed set of shards that ends in a single publish,
as ``build``, ``add`` and ``compact`` are; it takes their runner options (DirectRunner locally,
Dataflow, Flink or Spark by options), their retry-safe publish and their staging folder under the
run's token, which ``vismem gc`` already understands. Ray stays for long-lived actors (embedding on
GPUs, shards served from actors). The price: each worker holds the whole memory it searches.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from memory import leases, mutations, pruning, removals, storage
from memory import manifest as mf
from memory.memory import Memory
from memory.partition import hash_partition
from pipelines.beam_runner import METRICS, run_pipeline
from pipelines.build_publish import find_published
from pipelines.build_stage import remove_staging, staging_dir
from pipelines.progress import SILENT, MarkerWatch, mark, marker_dir

log = logging.getLogger("vismem.prune")
RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What every worker needs: plain values (it travels pickled to each)."""

    root: str
    version: int  # the version counted and pruned (the parent of the one published)
    token: str
    self_k: int
    rule: pruning.Rule
    probe_shards: int | None = None
    buckets: int = 4
    batch: int = pruning.BATCH

    @property
    def staging(self) -> str:
        return staging_dir(self.root, self.version + 1, self.token)

    @property
    def markers(self) -> str:
        """Where workers mark the shards they are done with (the driver's progress bars)."""
        return marker_dir(self.root, self.version + 1, self.token)


def write_counts(path: str, ids, counts) -> str:
    """``(id, v)`` rows as a Parquet staging file; returns ``path``."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": pa.array(np.asarray(ids, dtype=object), pa.string()),
                             "v": pa.array(np.asarray(counts, np.int64))}), sink)
    storage.write_bytes_atomic(path, sink.getvalue().to_pybytes())
    return path


def read_counts(paths) -> tuple[np.ndarray, np.ndarray]:
    """The ``(id, v)`` rows of staging files, summed per id."""
    parts = []
    for p in paths:
        t = pq.read_table(pa.BufferReader(storage.read_bytes(p)))
        parts.append((np.asarray(t.column("id").to_pylist(), dtype=object), t.column("v").to_numpy()))
    return pruning.sum_counts(parts)


class CountShard(beam.DoFn):
    """One shard's live items queried against the whole memory: ``(bucket, partial counts file)`` out."""

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg
        self.items_queried = Metrics.counter(METRICS, "items_queried")

    def setup(self):
        c = self.cfg
        self.dead = removals.tombstones_by_shard(c.root, mf.read_manifest(c.root, c.version))
        self.memory = Memory.open(c.root, c.version)
        self.search = pruning.memory_search(self.memory, c.probe_shards)

    def teardown(self):
        self.memory.close()

    def process(self, entry: mf.ShardEntry):
        c = self.cfg
        ids, labels, vectors = pruning.shard_queries(c.root, entry, self.dead.get(entry.path, ()))
        hit_ids, counts = pruning.self_query_counts(ids, labels, vectors, self.search, c.self_k, batch=c.batch)
        self.items_queried.inc(len(ids))
        mark(c.markers, "count", entry.path, len(ids))
        log.info("shard %s: %d items queried, %d neighbours were wrong", entry.name, len(ids), len(hit_ids))
        bucket = hash_partition(hit_ids, c.buckets)
        for b in np.unique(bucket):
            rows = bucket == b
            path = storage.join(c.staging, f"partial-{int(b):05d}", f"{uuid.uuid4().hex}.parquet")
            yield int(b), write_counts(path, hit_ids[rows], counts[rows])


class SumBucket(beam.DoFn):
    """One bucket's partial counts in, its totals ``(id, v)`` as one staging file out."""

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg
        self.items_with_wrong = Metrics.counter(METRICS, "items_with_wrong")

    def process(self, element):
        bucket, paths = element
        ids, v = read_counts(sorted(paths))
        self.items_with_wrong.inc(len(ids))
        path = storage.join(self.cfg.staging, f"totals-{bucket:05d}.{uuid.uuid4().hex[:8]}.parquet")
        yield write_counts(path, ids, v)


def load_counts(totals, cfg: PruneConfig) -> pruning.WrongCounts:
    """The whole count from the totals files (the parent's live items were all queried)."""
    parent = mf.read_manifest(cfg.root, cfg.version)
    return pruning.WrongCounts(*read_counts(sorted(totals)), version=cfg.version, items=parent.live_count)


class Reweight(beam.DoFn):
    """One shard in; with its live items' weights set to gamma(v), ``(its old path, new ShardEntry)`` out."""

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg
        self.shards_reweighted = Metrics.counter(METRICS, "shards_reweighted")
        self._counts = None

    def setup(self):
        self.dead = removals.tombstones_by_shard(self.cfg.root, mf.read_manifest(self.cfg.root, self.cfg.version))

    def process(self, entry: mf.ShardEntry, totals):
        if self._counts is None:  # once per worker: every shard it rewrites needs the same totals
            self._counts = load_counts(totals, self.cfg)
        new = pruning.reweighted_shard(self.cfg.root, entry, self._counts, self.cfg.rule,
                                       self.dead.get(entry.path, ()), version=self.cfg.version + 1,
                                       token=self.cfg.token)
        mark(self.cfg.markers, "reweight", entry.path, entry.count - len(self.dead.get(entry.path, ())))
        if new is not None:
            self.shards_reweighted.inc()
            yield entry.path, new


def _record(cfg: PruneConfig, counts: pruning.WrongCounts) -> dict:
    return pruning.record(cfg.rule, counts, self_k=cfg.self_k, probe_shards=cfg.probe_shards, engine="beam",
                          token=cfg.token)


def _write_result(cfg: PruneConfig, result: dict) -> dict:
    storage.write_bytes_atomic(storage.join(cfg.staging, RESULT), json.dumps(result, default=str).encode())
    return result


def publish_hard(totals, cfg: PruneConfig) -> dict:
    """Publish the hard-pruned version (the last step); the run's record for the driver."""
    counts = load_counts(totals, cfg)
    done = find_published(cfg.root, cfg.token, cfg.version + 1)
    if done is None:  # else a runner retrying this step after it published: publish nothing twice
        pruning.publish_hard(cfg.root, counts, cfg.rule, _record(cfg, counts))
    return _write_result(cfg, counts.summary())


def publish_soft(rewritten, totals, cfg: PruneConfig) -> dict:
    """Publish the soft-pruned version (the last step); the run's record for the driver."""
    counts = load_counts(totals, cfg)
    if find_published(cfg.root, cfg.token, cfg.version + 1) is None:
        pruning.publish_soft(cfg.root, cfg.version, dict(rewritten), token=cfg.token, detail=_record(cfg, counts))
    return _write_result(cfg, {**counts.summary(), "reweighted_shards": len(rewritten)})


def prune_pipeline(p: beam.Pipeline, cfg: PruneConfig, entries: list):
    """Add the job's transforms to ``p`` (the graph in this module's docstring)."""
    shards = p | "Shards" >> beam.Create(entries) | "SpreadShards" >> beam.Reshuffle()
    totals = (shards | "CountShard" >> beam.ParDo(CountShard(cfg)) | "GroupBuckets" >> beam.GroupByKey()
              | "SumBucket" >> beam.ParDo(SumBucket(cfg)) | "Totals" >> beam.combiners.ToList())
    if cfg.rule.mode == "hard":
        return totals | "PublishHard" >> beam.Map(publish_hard, cfg)
    rewritten = (shards | "Reweight" >> beam.ParDo(Reweight(cfg), beam.pvalue.AsSingleton(totals))
                 | "Rewritten" >> beam.combiners.ToList())
    return rewritten | "PublishSoft" >> beam.Map(publish_soft, beam.pvalue.AsSingleton(totals), cfg)


def rule_of(hard: int | None, soft: bool, c: float | None, dd: float | None) -> pruning.Rule:
    """The rule of ``vismem prune``'s options: exactly one of ``hard`` (a threshold) or ``soft``.

    Raises:
        ValueError: both or neither, or ``c``/``dd`` without ``soft`` (and :class:`memory.pruning.Rule`'s checks).
    """
    if (hard is not None) == bool(soft):
        raise ValueError("give exactly one of --hard THRESHOLD (remove items with v >= THRESHOLD) or --soft "
                         "(weight items by dd / (c + v))")
    if hard is not None:
        if c is not None or dd is not None:
            raise ValueError("--c and --dd set soft pruning's gamma = dd / (c + v): give them with --soft, not --hard")
        return pruning.Rule.hard(hard)
    return pruning.Rule.soft(1.0 if c is None else c, 1.75 if dd is None else dd)


def prune_memory(root: str, *, self_k: int, hard: int | None = None, soft: bool = False, c: float | None = None,
                 dd: float | None = None, probe_shards: int | None = None, pipeline_args=None,
                 batch: int = pruning.BATCH, progress=SILENT) -> dict:
    """Prune the latest version of ``root`` with Beam and publish the result as a new version; a summary.

    ``self_k`` neighbours per self-query count towards each item's ``v``; ``hard=T`` tombstones every
    item with ``v >= T`` (reason "pruned", not forgotten); ``soft`` sets each live item's weight to
    ``dd / (c + v)`` (1 for ``v = 0``). Equal to ``memory.pruning.prune_in_process`` and to
    ``eval.pruning`` over one search of every item. Changes published meanwhile are kept (hard: the
    ids are tombstoned wherever the latest version holds them; soft: see
    ``memory.pruning.soft_version``). Nothing is published (``changed`` False) when nothing changes.
    ``progress`` (``pipelines.progress``) draws the self-queries (and, soft, the reweighting) per shard.

    Raises:
        ValueError: a bad rule, ``self_k`` or ``probe_shards``, or too few live items for ``self_k``.
        FileNotFoundError: no memory at ``root``.
        BuildFailed: the job failed; nothing was published.
    """
    rule = rule_of(hard, soft, c, dd)
    pruning.check_self_k(self_k)
    token = mutations.new_token()
    with leases.writer_lease(root, token, holder="vismem prune") as parent:
        pruning.check_request(root, parent, self_k, probe_shards)
        cfg = PruneConfig(root=root, version=parent.version, token=token, self_k=int(self_k), rule=rule,
                          probe_shards=probe_shards, buckets=max(4, len(parent.shards)), batch=batch)
        log.info("pruning %s version %d (%s, self-k %d): %d live items in %d shards", root, parent.version,
                 rule.params(), self_k, parent.live_count, len(parent.shards))
        progress.note(f"{root} version {parent.version}: {parent.live_count:,} live items in {len(parent.shards)} "
                      f"shard{'s' * (len(parent.shards) != 1)}, self-k {self_k}")
        stages = [("count", "self-queries", len(parent.shards), parent.live_count, "items")]
        if rule.mode == "soft":
            stages.append(("reweight", "reweight shards", len(parent.shards), parent.live_count, "items"))
        try:
            with MarkerWatch(progress, cfg.markers, stages) as watch:
                run = run_pipeline(lambda p: prune_pipeline(p, cfg, list(parent.shards)), pipeline_args, "prune")
                watch.finish({})
            result = json.loads(storage.read_bytes(storage.join(cfg.staging, RESULT)))
        finally:
            storage.remove(cfg.markers, recursive=True)
            remove_staging(root, cfg.version + 1, token)
            run_dir = storage.join(root, "shards", f"v{cfg.version + 1:08d}.{token}")
            if not storage.list_names(run_dir):  # nothing but staging was written there (hard, or no change)
                storage.remove(run_dir, recursive=True)
    version = find_published(root, token, parent.version + 1)
    current = mf.read_manifest(root, version) if version is not None else mf.read_manifest(root)
    out = {"memory": root, "version": current.version, "parent_version": parent.version if version else None,
           "changed": version is not None, **rule.params(), "self_k": int(self_k), "probe_shards": probe_shards,
           **result, "live_count": current.live_count, "wall_seconds": run["seconds"], "counters": run["counters"]}
    if version is not None and rule.mode == "hard":
        out["removed"] = current.change_detail["removed"]
    if version is not None and "rebased" in (current.change_detail or {}):
        out["rebased"] = current.change_detail["rebased"]
    return out
