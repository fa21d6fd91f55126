"""The Beam graph of a build or add: embedding shards in, new shards and their manifest entries out.

Stages, each a thin Beam wrapper around a pure function (``pipelines.validate``, ``memory.*``):

    files ─► Stage ─► staging files (paths) ─► GroupByShard ─► WriteShard ─► Publish (manifest last)
      │        ├─► id buckets ─► FindDuplicates (side input of WriteShard)
      │        └─► dead rows ─► dead letter (Parquet, one reason each)
      └─► Sample (new k-means builds only: a first pass) ─► KMeans (side input of Stage)

Stage reads and validates one file, assigns each row its shard (hash of id, or nearest k-means
cell) and writes the rows of each shard to a staging file. No step holds more than one input
file's rows or one shard's (``pipelines.build_stage``): the rows reach their shard's writer through
staging files, only paths go through the runner's shuffle, and k-means trains on a sample. A new
k-means build reads its files twice (the router must exist before any row is assigned); every
other build reads them once.

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
from memory import items, removals, schema, storage, tuning
from memory.partition import default_cells, default_sample, hash_partition, kmeans_partition, train_router
from memory.shard import write_shard
from pipelines import validate
from pipelines.build_stage import (concat_batches, read_ids, read_pieces, read_sample, remove_staging, split_by_shard,
                                   staging_dir, write_ids, write_piece, write_sample)
from pipelines.beam_runner import METRICS
from pipelines.build_config import BuildConfig
from pipelines.build_publish import publish, write_dead_letter
from pipelines.progress import mark, marker_dir

log = logging.getLogger("vismem.build")
DEAD = "dead"
IDS = "ids"


def forgotten_ids(cfg: BuildConfig) -> set:
    """The ids the parent version's forget list holds: removed for unlearning (none for a new memory)."""
    if cfg.parent_version is None:
        return set()
    parent = mf.read_manifest(cfg.out, cfg.parent_version)
    return set(removals.forget_list(cfg.out, parent).column("id").to_pylist())


def write_shard_attempt(root: str, version: int, token: str, name: str, partition: int, rows: dict, *,
                        backend: str, backend_params: dict, storage: str, target_recall: float | None = None,
                        tuning_queries=None, started: float | None = None) -> mf.ShardEntry:
    """Write one shard of ``rows`` (ids, embeddings, labels, provenance, optional weights); its manifest entry.

    A folder per attempt: a runner may retry a bundle, and a retry must never overwrite files whose
    checksums another attempt's entry records. The manifest names the folder of the attempt it
    publishes; gc removes the others. Build, add and compact all write their shards here.
    ``build_seconds`` counts from ``started`` (a ``time.perf_counter()``; default: now). ``storage``,
    ``target_recall`` and ``tuning_queries`` (an array) go to ``write_shard``.
    """
    t0 = time.perf_counter() if started is None else started
    rel = mf.shard_dir(version, name, token=token, attempt=uuid.uuid4().hex[:8])
    entry = write_shard(
        root, rel, rows["embeddings"], rows["ids"], rows["labels"], name=name, partition=partition,
        backend_name=backend, weights=rows.get("weights"), backend_params=backend_params or None,
        provenance={k: rows[k] for k in schema.PROVENANCE_COLUMNS}, storage=storage,
        target_recall=target_recall, tuning_queries=tuning_queries,
    )
    return dataclasses.replace(entry, build_seconds=round(time.perf_counter() - t0, 3))


def tuning_sample(path: str | None):
    """The embeddings of the user's tuning queries (``--tuning-queries``; a random ``memory.tuning.SAMPLE``
    of them at most), or None."""
    if not path:
        return None
    emb = schema.read_embedding_shards(path)["embeddings"]
    keep = np.random.default_rng(0).permutation(len(emb))[:tuning.SAMPLE]
    return np.asarray(emb[np.sort(keep)], dtype=np.float32)


def valid_batches(path: str, cfg: BuildConfig, forgotten: set):
    """``(valid rows, dead-letter records)`` of each batch of one embedding file, valid rows L2-normalised;
    an unreadable file is one ``(None, [record])``."""
    try:
        batches = list(validate.read_batches(path, cfg.batch_rows))
    except (ValueError, KeyError, pa.ArrowException) as exc:  # bad data, not I/O: one dead-letter record
        yield None, [{"id": "", "file": path, "row": -1, "label": -1, "source": "", "uri": "",
                      "reason": f"unreadable embedding shard: {exc}"}]
        return
    for batch in batches:
        yield validate.validate_batch(batch, dim=cfg.dim, num_classes=len(cfg.class_names),
                                      norm_tolerance=cfg.norm_tolerance, forgotten=forgotten, readmit=cfg.readmit)


def id_bucket_count(cfg: BuildConfig) -> int:
    return max(cfg.num_shards, 4)


def assign(batch: dict, cfg: BuildConfig, router) -> np.ndarray:
    """The shard of each row: by id hash (stable) or by nearest k-means cell."""
    if cfg.partition == "hash":
        return hash_partition(batch["ids"], cfg.num_shards)
    return kmeans_partition(batch["embeddings"], np.asarray(router["centroids"], np.float32), router["cell_partitions"])


class StageFile(beam.DoFn):
    """One embedding file in; its valid rows, split by shard, in staging files: ``(shard, path)`` out.
    Bad rows to ``dead``; the new ids by bucket to ``ids`` (duplicates are found across all files)."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.rows_read = Metrics.counter(METRICS, "rows_read")
        self.rows_dead = Metrics.counter(METRICS, "rows_dead")

    def setup(self):
        self.forgotten = forgotten_ids(self.cfg)
        self.folder = staging_dir(self.cfg.out, self.cfg.version, self.cfg.token)
        self.markers = marker_dir(self.cfg.out, self.cfg.version, self.cfg.token)

    def process(self, path, router):
        pieces, ids, count = {}, {}, 0
        for good, dead in valid_batches(path, self.cfg, self.forgotten):
            if good is not None:
                self.rows_read.inc(len(good["ids"]) + len(dead))
                count += len(good["ids"]) + len(dead)
            if dead:
                self.rows_dead.inc(len(dead))
                yield beam.pvalue.TaggedOutput(DEAD, dead)
            if good is None or not len(good["ids"]):
                continue
            for b, part in validate.id_buckets(good["ids"], id_bucket_count(self.cfg)).items():
                ids.setdefault(b, []).append(part)
            for j, rows in split_by_shard(good, assign(good, self.cfg, router)).items():
                pieces.setdefault(j, []).append(rows)
        for b, parts in sorted(ids.items()):  # staged too: the shuffle carries paths, never the ids
            yield beam.pvalue.TaggedOutput(IDS, (b, ("new", write_ids(self.folder, b, np.concatenate(parts)))))
        for j, parts in sorted(pieces.items()):
            yield j, write_piece(self.folder, j, concat_batches(parts))
        mark(self.markers, "read", path, count)  # the driver's progress bar (pipelines.progress)
        log.info("staged %s: %d rows in %d shards", path, count, len(pieces))


class SampleFile(beam.DoFn):
    """One embedding file in, the path of a staging file holding the k-means training sample of its valid rows
    out (a first pass; nothing else). Only the path goes through the runner: with the rows themselves the
    multi-process DirectRunner's driver held the whole sample (1.1 GB at 10M items)."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg

    def setup(self):
        self.forgotten = forgotten_ids(self.cfg)
        self.markers = marker_dir(self.cfg.out, self.cfg.version, self.cfg.token)

    def process(self, path, fraction):
        count, rows = 0, []
        for good, dead in valid_batches(path, self.cfg, self.forgotten):
            if good is not None:
                count += len(good["ids"]) + len(dead)
            if good is not None and len(good["ids"]):
                rows.append(sample_rows(good, fraction))
        mark(self.markers, "sample", path, count)
        rows = np.concatenate(rows) if rows else np.zeros((0, self.cfg.dim or 0), np.float32)
        if len(rows):
            folder = staging_dir(self.cfg.out, self.cfg.version, self.cfg.token)
            yield write_sample(folder, rows)


def existing_id_buckets(item, cfg: BuildConfig):
    """The live ids of one of the memory's shards, by bucket, in staging files (an add must not repeat them)."""
    out, num_buckets = cfg.out, id_bucket_count(cfg)
    path, removed = item
    ids = np.asarray(items.read_items_at(storage.join(out, path), ["id"]).column("id").to_pylist(), dtype=object)
    if removed:
        gone = set(removed)
        ids = ids[np.fromiter((i not in gone for i in ids), dtype=bool, count=len(ids))]
    folder = staging_dir(cfg.out, cfg.version, cfg.token)
    for b, part in validate.id_buckets(ids, num_buckets).items():
        yield b, ("old", write_ids(folder, b, part))


def find_duplicates(element):
    """``(id, reason)`` of each new id of one bucket given twice or already in the memory."""
    _, parts = element
    new = read_ids(sorted(p for kind, p in parts if kind == "new"))
    if not len(new):
        return
    yield from items.duplicate_reasons(new, read_ids(sorted(p for kind, p in parts if kind == "old"))).items()


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


def train_centroids(sample_paths, cfg: BuildConfig) -> dict:
    """The k-means router trained on the staged sample files: ``{"centroids": [[...]], "cell_partitions":
    [...]}`` (cells and their shards)."""
    sample = read_sample(sample_paths, cfg.dim)  # in an order fixed by the input files: one copy, no sort
    cells = cfg.kmeans_cells or default_cells(cfg.num_shards, len(sample))
    if len(sample) < cells:
        raise ValueError(f"k-means needs at least {cells} valid rows to sample (one per cell), got {len(sample)}")
    log.info("training %d k-means cells for %d shards on %d sampled rows", cells, cfg.num_shards, len(sample))
    centroids, cell_partitions = train_router(sample, cfg.num_shards, cells, seed=cfg.seed)
    return {"centroids": [list(map(float, c)) for c in centroids], "cell_partitions": [int(p) for p in cell_partitions]}


class WriteShard(beam.DoFn):
    """All rows of one shard in; its index and files written by the memory core's writer;
    ``(its ShardEntry, the forgotten ids it re-admits)`` out."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.shards_written = Metrics.counter(METRICS, "shards_written")
        self.items_written = Metrics.counter(METRICS, "items_written")

    def setup(self):
        self.forgotten = forgotten_ids(self.cfg) if self.cfg.readmit else set()
        self.tuning_queries = tuning_sample(self.cfg.tuning_queries)
        self.markers = marker_dir(self.cfg.out, self.cfg.version, self.cfg.token)

    def process(self, element, duplicates):
        c = self.cfg
        part, paths = element
        batch = read_pieces(sorted(paths))  # the shard's rows, staged by StageFile
        dup = np.fromiter((i in duplicates for i in batch["ids"]), dtype=bool, count=len(batch["ids"]))
        if dup.any():
            idx = np.flatnonzero(dup)
            yield beam.pvalue.TaggedOutput(
                DEAD, validate.dead_records(batch, idx, [duplicates[batch["ids"][i]] for i in idx]))
            batch = validate.take(batch, np.flatnonzero(~dup))
        if not len(batch["ids"]):
            return
        entry = write_shard_attempt(c.out, c.version, c.token, c.shard_name(part), part, batch, backend=c.backend,
                                    backend_params=c.backend_params, storage=c.storage,
                                    target_recall=c.target_recall, tuning_queries=self.tuning_queries)
        self.shards_written.inc()
        self.items_written.inc(entry.count)
        mark(self.markers, "write", entry.name, entry.count)
        log.info("shard %s written: %d items in %.2f s", entry.name, entry.count, entry.build_seconds)
        readmitted = sorted(self.forgotten.intersection(batch["ids"].tolist())) if self.forgotten else []
        yield entry, readmitted


def clean_staging(result, cfg: BuildConfig):
    remove_staging(cfg.out, cfg.version, cfg.token)
    return result


def build_pipeline(p: beam.Pipeline, cfg: BuildConfig):
    """Add the build's transforms to ``p`` (the graph in this module's docstring)."""
    files = p | "Files" >> beam.Create(list(cfg.files)) | "SpreadFiles" >> beam.Reshuffle()
    if cfg.partition == "kmeans" and cfg.centroids is None:
        sample = cfg.kmeans_sample or default_sample(cfg.num_shards, cfg.kmeans_cells)
        fraction = min(1.0, sample / max(cfg.total_rows, 1))
        router = (files | "Sample" >> beam.ParDo(SampleFile(cfg), fraction)
                  | "PoolSample" >> beam.combiners.ToList()
                  | "KMeans" >> beam.Map(train_centroids, cfg))
    else:
        known = None if not cfg.centroids else {
            "centroids": [list(c) for c in cfg.centroids],
            "cell_partitions": list(cfg.cell_partitions or range(len(cfg.centroids)))}
        router = p | "KnownRouter" >> beam.Create([known])
    staged = files | "Stage" >> beam.ParDo(StageFile(cfg), beam.pvalue.AsSingleton(router)).with_outputs(
        DEAD, IDS, main="pieces")
    id_parts = staged[IDS]
    if cfg.existing:
        old = (p | "MemoryShards" >> beam.Create(list(cfg.existing)) | "SpreadShards" >> beam.Reshuffle()
               | "OldIdBuckets" >> beam.FlatMap(existing_id_buckets, cfg))
        id_parts = (id_parts, old) | "AllIds" >> beam.Flatten()
    duplicates = id_parts | "GroupIds" >> beam.GroupByKey() | "FindDuplicates" >> beam.FlatMap(find_duplicates)
    written = (staged.pieces | "GroupByShard" >> beam.GroupByKey()
               | "WriteShard" >> beam.ParDo(WriteShard(cfg), beam.pvalue.AsDict(duplicates))
               .with_outputs(DEAD, main="entry"))
    dead = ((staged[DEAD], written[DEAD]) | "AllDead" >> beam.Flatten()
            | "PoolDead" >> beam.CombineGlobally(ConcatLists())
            | "WriteDeadLetter" >> beam.Map(write_dead_letter, cfg))
    return (written.entry | "Entries" >> beam.combiners.ToList()
            | "Publish" >> beam.Map(publish, cfg, beam.pvalue.AsSingleton(dead), beam.pvalue.AsSingleton(router))
            | "CleanStaging" >> beam.Map(clean_staging, cfg))
