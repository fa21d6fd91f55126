"""The Beam graph of a build or add: embedding shards in, new shards and their manifest entries out.

Stages, each a thin Beam wrapper around a pure function (``pipelines.validate``, ``memory.*``):

    files ─► ReadValidate ─► good batches ─► Assign (hash | k-means) ─► GroupByShard ─► WriteShard ─┐
                 │                 ├─► id buckets ─► FindDuplicates (side input) ───────────┘       │
                 │                 └─► Sample ─► KMeans (side input of Assign, k-means only)          │
                 └─► dead rows ─────────────────────────────► dead letter (Parquet, one reason each)  │
                                                                  Publish: manifest written last ◄─────┘

Each shard is written by ``memory.shard.write_shard`` (the single-process ``write_memory`` uses the
same writer) under ``shards/vNNNNNNNN.TOKEN/``, a folder no manifest names yet. The manifest is
written by the last step (``pipelines.build_publish``), which Beam runs only after every shard
succeeded; a build that dies earlier publishes nothing and the previous version stays current.
Workers receive paths and a plain config, never loaded indices.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from memory import manifest as mf
from memory import items, removals, schema, storage
from memory.partition import default_cells, hash_partition, kmeans_partition, train_router
from memory.shard import write_shard
from pipelines import validate
from pipelines.beam_runner import METRICS
from pipelines.build_config import BuildConfig
from pipelines.build_publish import publish, write_dead_letter

log = logging.getLogger("vismem.build")
DEAD = "dead"


def forgotten_ids(cfg: BuildConfig) -> set:
    """The ids the parent version's forget list holds: removed for unlearning (none for a new memory)."""
    if cfg.parent_version is None:
        return set()
    parent = mf.read_manifest(cfg.out, cfg.parent_version)
    return set(removals.forget_list(cfg.out, parent).column("id").to_pylist())


def write_shard_attempt(root: str, version: int, token: str, name: str, partition: int, rows: dict, *,
                        backend: str, backend_params: dict, storage_dtype: str,
                        started: float | None = None) -> mf.ShardEntry:
    """Write one shard of ``rows`` (ids, embeddings, labels, provenance, optional weights); its manifest entry.

    A folder per attempt: a runner may retry a bundle, and a retry must never overwrite files whose
    checksums another attempt's entry records. The manifest names the folder of the attempt it
    publishes; gc removes the others. Build, add and compact all write their shards here.
    ``build_seconds`` counts from ``started`` (a ``time.perf_counter()``; default: now).
    """
    t0 = time.perf_counter() if started is None else started
    rel = mf.shard_dir(version, name, token=token, attempt=uuid.uuid4().hex[:8])
    entry = write_shard(
        root, rel, rows["embeddings"], rows["ids"], rows["labels"], name=name, partition=partition,
        backend_name=backend, weights=rows.get("weights"), backend_params=backend_params or None,
        provenance={k: rows[k] for k in schema.PROVENANCE_COLUMNS}, storage_dtype=storage_dtype,
    )
    return dataclasses.replace(entry, build_seconds=round(time.perf_counter() - t0, 3))


class ReadValidate(beam.DoFn):
    """One embedding file in; batches of valid, L2-normalised rows out; bad rows to ``dead``."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.rows_read = Metrics.counter(METRICS, "rows_read")
        self.rows_dead = Metrics.counter(METRICS, "rows_dead")

    def setup(self):
        self.forgotten = forgotten_ids(self.cfg)

    def process(self, path):
        c = self.cfg
        try:
            batches = list(validate.read_batches(path, c.batch_rows))
        except (ValueError, KeyError, pa.ArrowException) as exc:  # bad data, not I/O: one dead-letter record
            self.rows_dead.inc()
            yield beam.pvalue.TaggedOutput(DEAD, [{"id": "", "file": path, "row": -1, "label": -1, "source": "",
                                                   "uri": "", "reason": f"unreadable embedding shard: {exc}"}])
            return
        for batch in batches:
            good, dead = validate.validate_batch(batch, dim=c.dim, num_classes=len(c.class_names),
                                                 norm_tolerance=c.norm_tolerance, forgotten=self.forgotten,
                                                 readmit=c.readmit)
            self.rows_read.inc(len(batch["ids"]))
            if dead:
                self.rows_dead.inc(len(dead))
                yield beam.pvalue.TaggedOutput(DEAD, dead)
            if len(good["ids"]):
                yield good
        log.info("read %s: %d rows", path, sum(len(b["ids"]) for b in batches))


def new_id_buckets(batch, num_buckets):
    for b, ids in validate.id_buckets(batch["ids"], num_buckets).items():
        yield b, ("new", ids)


def existing_id_buckets(item, out, num_buckets):
    """The live ids of one of the memory's shards, by bucket (an add must not repeat them)."""
    path, removed = item
    ids = np.asarray(items.read_items_at(storage.join(out, path), ["id"]).column("id").to_pylist(), dtype=object)
    if removed:
        gone = set(removed)
        ids = ids[np.fromiter((i not in gone for i in ids), dtype=bool, count=len(ids))]
    for b, part in validate.id_buckets(ids, num_buckets).items():
        yield b, ("old", part)


def find_duplicates(element):
    _, parts = element
    new = [ids for kind, ids in parts if kind == "new"]
    old = [ids for kind, ids in parts if kind == "old"]
    if not new:
        return
    yield from items.duplicate_reasons(np.concatenate(new), np.concatenate(old) if old else ()).items()


def _unit_hash(ids) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, person=b"vmsample").digest(),
                                       "little") / 2.0**64 for i in ids), dtype=np.float64, count=len(ids))


def sample_rows(batch, fraction):
    """A sample chosen by id hash: the same rows whatever the runner, bundles or file order."""
    return batch["embeddings"][_unit_hash(batch["ids"]) < fraction]


class ConcatLists(beam.CombineFn):
    """Lists in, one list out."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, items):
        acc.extend(items)
        return acc

    def merge_accumulators(self, accs):
        return [x for acc in accs for x in acc]

    def extract_output(self, acc):
        return acc


class ConcatRows(ConcatLists):
    """Row blocks ``(n_i, dim)`` in, one ``(sum n_i, dim)`` array out."""

    def __init__(self, dim):
        self.dim = dim

    def add_input(self, acc, rows):
        acc.append(rows)
        return acc

    def extract_output(self, acc):
        return np.concatenate(acc) if acc else np.zeros((0, self.dim), np.float32)


def train_centroids(sample, cfg: BuildConfig) -> dict:
    """The k-means router: ``{"centroids": [[...]], "cell_partitions": [...]}`` (cells and their shards)."""
    cells = cfg.kmeans_cells or default_cells(cfg.num_shards, len(sample))
    if len(sample) < cells:
        raise ValueError(f"k-means needs at least {cells} valid rows to sample (one per cell), got {len(sample)}")
    # Order the sample canonically so the centroids do not depend on bundle order.
    sample = sample[np.lexsort(sample.T[::-1])]
    log.info("training %d k-means cells for %d shards on %d sampled rows", cells, cfg.num_shards, len(sample))
    centroids, cell_partitions = train_router(sample, cfg.num_shards, cells, seed=cfg.seed)
    return {"centroids": [list(map(float, c)) for c in centroids], "cell_partitions": [int(p) for p in cell_partitions]}


class Assign(beam.DoFn):
    """Rows to ``(shard number, rows)``: by id hash (stable) or by nearest k-means centroid."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg

    def process(self, batch, router):
        if self.cfg.partition == "hash":
            part = hash_partition(batch["ids"], self.cfg.num_shards)
        else:
            part = kmeans_partition(batch["embeddings"], np.asarray(router["centroids"], np.float32),
                                    router["cell_partitions"])
        for j in np.unique(part):
            yield int(j), validate.take(batch, np.flatnonzero(part == j))


class WriteShard(beam.DoFn):
    """All rows of one shard in; its index and files written by the memory core's writer;
    ``(its ShardEntry, the forgotten ids it re-admits)`` out."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.shards_written = Metrics.counter(METRICS, "shards_written")
        self.items_written = Metrics.counter(METRICS, "items_written")

    def setup(self):
        self.forgotten = forgotten_ids(self.cfg) if self.cfg.readmit else set()

    def process(self, element, duplicates):
        c = self.cfg
        part, batches = element
        batch = validate.concat(list(batches))
        dup = np.fromiter((i in duplicates for i in batch["ids"]), dtype=bool, count=len(batch["ids"]))
        if dup.any():
            idx = np.flatnonzero(dup)
            yield beam.pvalue.TaggedOutput(
                DEAD, validate.dead_records(batch, idx, [duplicates[batch["ids"][i]] for i in idx]))
            batch = validate.take(batch, np.flatnonzero(~dup))
        if not len(batch["ids"]):
            return
        entry = write_shard_attempt(c.out, c.version, c.token, c.shard_name(part), part, batch, backend=c.backend,
                                    backend_params=c.backend_params, storage_dtype=c.storage_dtype)
        self.shards_written.inc()
        self.items_written.inc(entry.count)
        log.info("shard %s written: %d items in %.2f s", entry.name, entry.count, entry.build_seconds)
        readmitted = sorted(self.forgotten.intersection(batch["ids"].tolist())) if self.forgotten else []
        yield entry, readmitted


def build_pipeline(p: beam.Pipeline, cfg: BuildConfig):
    """Add the build's transforms to ``p`` (the graph in this module's docstring)."""
    files = p | "Files" >> beam.Create(list(cfg.files)) | "SpreadFiles" >> beam.Reshuffle()
    read = files | "ReadValidate" >> beam.ParDo(ReadValidate(cfg)).with_outputs(DEAD, main="good")
    good = read.good
    buckets = max(cfg.num_shards, 4)
    id_parts = good | "NewIdBuckets" >> beam.FlatMap(new_id_buckets, buckets)
    if cfg.existing:
        old = (p | "MemoryShards" >> beam.Create(list(cfg.existing)) | "SpreadShards" >> beam.Reshuffle()
               | "OldIdBuckets" >> beam.FlatMap(existing_id_buckets, cfg.out, buckets))
        id_parts = (id_parts, old) | "AllIds" >> beam.Flatten()
    duplicates = id_parts | "GroupIds" >> beam.GroupByKey() | "FindDuplicates" >> beam.FlatMap(find_duplicates)
    if cfg.partition == "kmeans" and cfg.centroids is None:
        fraction = min(1.0, cfg.kmeans_sample / max(cfg.total_rows, 1))
        router = (good | "Sample" >> beam.Map(sample_rows, fraction)
                     | "PoolSample" >> beam.CombineGlobally(ConcatRows(cfg.dim))
                     | "KMeans" >> beam.Map(train_centroids, cfg))
    else:
        known = None if not cfg.centroids else {
            "centroids": [list(c) for c in cfg.centroids],
            "cell_partitions": list(cfg.cell_partitions or range(len(cfg.centroids)))}
        router = p | "KnownRouter" >> beam.Create([known])
    written = (good | "Assign" >> beam.ParDo(Assign(cfg), beam.pvalue.AsSingleton(router))
               | "GroupByShard" >> beam.GroupByKey()
               | "WriteShard" >> beam.ParDo(WriteShard(cfg), beam.pvalue.AsDict(duplicates))
               .with_outputs(DEAD, main="entry"))
    dead = ((read[DEAD], written[DEAD]) | "AllDead" >> beam.Flatten()
            | "PoolDead" >> beam.CombineGlobally(ConcatLists())
            | "WriteDeadLetter" >> beam.Map(write_dead_letter, cfg))
    return (written.entry | "Entries" >> beam.combiners.ToList()
            | "Publish" >> beam.Map(publish, cfg, beam.pvalue.AsSingleton(dead), beam.pvalue.AsSingleton(router)))
