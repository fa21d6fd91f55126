"""The Beam build: embedding shards in, a new published memory version out (``vismem build`` / ``add``).

Stages, each a thin Beam wrapper around a pure function (``pipelines.validate``, ``memory.*``):

    files ─► ReadValidate ─► good batches ─► Assign (hash | k-means) ─► GroupByShard ─► WriteShard ─┐
                 │                 ├─► id buckets ─► FindDuplicates (side input) ───────────┘       │
                 │                 └─► Sample ─► KMeans (side input of Assign, k-means only)          │
                 └─► dead rows ─────────────────────────────► dead letter (Parquet, one reason each)  │
                                                                  Publish: manifest written last ◄─────┘

Each shard is written by ``memory.shard.write_shard`` (the single-process ``write_memory`` uses the
same writer) under ``shards/vNNNNNNNN.TOKEN/``, a folder no manifest names yet. The manifest is
written by the last step, which Beam runs only after every shard succeeded; a build that dies
earlier publishes nothing and the previous version stays current. Workers receive paths and a
plain config, never loaded indices.

Runners: the DirectRunner by default (``--direct_running_mode multi_processing`` pickles every DoFn
as a cluster does); any other by Beam options, e.g. ``--runner DataflowRunner --project P
--region R --temp_location gs://B/tmp``, ``--runner FlinkRunner --flink_master HOST:8081
--environment_type LOOPBACK`` or ``--runner SparkRunner --spark_master_url spark://HOST:7077``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
import uuid
from collections import Counter

import re

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from memory import manifest as mf
from memory import mutations, removals, storage
from memory.backends import BACKENDS
from memory.partition import default_cells, hash_partition, kmeans_partition, train_router
from memory.shard import write_shard
from pipelines import validate

log = logging.getLogger("vismem.build")
DEAD = "dead"
PARTITIONS = ("hash", "kmeans")


class BuildFailed(ValueError):
    """The pipeline failed; nothing was published."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything a worker needs: plain values and paths (it travels pickled to every worker)."""

    out: str
    version: int
    token: str
    parent_version: int | None
    files: tuple
    total_rows: int
    dim: int
    class_names: tuple
    num_shards: int
    partition: str = "hash"
    centroids: tuple | None = None  # an add reuses the memory's k-means cells and their shards
    cell_partitions: tuple | None = None
    backend: str = "scann"
    backend_params: dict = dataclasses.field(default_factory=dict)
    storage_dtype: str = "float32"
    norm_tolerance: float | None = 0.01
    readmit: bool = False
    batch_rows: int = 65536
    kmeans_sample: int = 100_000
    kmeans_cells: int | None = None
    seed: int = 0
    encoder: dict = dataclasses.field(default_factory=dict)
    existing: tuple = ()  # add: ((shard path, removed ids), ...) of the memory's shards

    @property
    def shard_dir(self) -> str:
        return f"shards/v{self.version:08d}.{self.token}"

    def shard_name(self, partition: int) -> str:
        name = mf.shard_name(partition, self.num_shards)
        return name if self.parent_version is None else f"{name}-add-v{self.version:08d}"


# ---- driver side: inputs ---------------------------------------------------------------------------

def expand_inputs(spec) -> list[str]:
    """Embedding shard paths from a file, a folder (its ``*.parquet``) or a glob, local or ``gs://``."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for s in specs:
        fs, p = storage.filesystem(s)
        if fs.isdir(p):
            p = p.rstrip("/") + "/*.parquet"
        found = sorted(fs.glob(p)) if any(c in p for c in "*?[") else ([p] if fs.exists(p) else [])
        if not found:
            raise FileNotFoundError(f"no embedding shards match {s}")
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        out += [f"{proto}://{f}" if storage.is_remote(s) else f for f in found]
    return out


def inspect_inputs(files: list[str]) -> dict:
    """Row counts, dimensions and encoders from the Parquet footers only (no data is read)."""
    rows, dims, encoders = 0, Counter(), set()
    for f in files:
        fs, p = storage.filesystem(f)
        try:
            with fs.open(p, "rb") as fh:
                pf = pq.ParquetFile(fh)
                n = pf.metadata.num_rows
                typ = pf.schema_arrow.field("embedding").type
                meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
        except Exception:  # noqa: BLE001 - the worker reads it again and dead-letters it with the reason
            continue
        rows += n
        dims[getattr(typ, "list_size", -1)] += n
        if meta.get("encoder"):
            encoders.add((meta["encoder"], meta.get("encoder_version", "")))
    if len(encoders) > 1:
        raise ValueError(f"the embedding shards come from different encoders {sorted(encoders)}: "
                         "one memory holds one encoder's embeddings")
    enc = {"name": e[0], "version": e[1]} if (e := next(iter(encoders), None)) else {}
    return {"rows": rows, "dims": dims, "encoder": enc}


# ---- worker side: DoFns and combine functions --------------------------------------------------------

class ReadValidate(beam.DoFn):
    """One embedding file in; batches of valid, L2-normalised rows out; bad rows to ``dead``."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.rows_read = Metrics.counter("vismem.build", "rows_read")
        self.rows_dead = Metrics.counter("vismem.build", "rows_dead")

    def setup(self):
        self.forgotten = set()
        if self.cfg.parent_version is not None:
            parent = mf.read_manifest(self.cfg.out, self.cfg.parent_version)
            self.forgotten = set(removals.forget_list(self.cfg.out, parent).column("id").to_pylist())

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
    fs, p = storage.filesystem(storage.join(out, path, "items.parquet"))
    with fs.open(p, "rb") as f:
        ids = np.asarray(pq.read_table(f, columns=["id"]).column("id").to_pylist(), dtype=object)
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
    yield from validate.duplicate_ids(np.concatenate(new), np.concatenate(old) if old else ()).items()


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
    """All rows of one shard in; its index and files written by the memory core's writer; its entry out."""

    def __init__(self, cfg: BuildConfig):
        self.cfg = cfg
        self.shards_written = Metrics.counter("vismem.build", "shards_written")
        self.items_written = Metrics.counter("vismem.build", "items_written")

    def setup(self):
        self.forgotten = set()
        if self.cfg.readmit and self.cfg.parent_version is not None:
            parent = mf.read_manifest(self.cfg.out, self.cfg.parent_version)
            self.forgotten = set(removals.forget_list(self.cfg.out, parent).column("id").to_pylist())

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
        t0 = time.perf_counter()
        name = c.shard_name(part)
        # A folder per attempt: a runner may retry a bundle, and a retry must never overwrite files
        # whose checksums another attempt's entry records. The manifest names the folder of the
        # attempt it publishes; gc removes the others.
        rel = f"{c.shard_dir}/{name}.{uuid.uuid4().hex[:8]}"
        entry = write_shard(
            storage.join(c.out, rel), batch["embeddings"], batch["ids"], batch["labels"], backend_name=c.backend,
            provenance={k: batch[k] for k in ("label_source", "confidence", "source", "uri")},
            backend_params=c.backend_params or None, storage_dtype=c.storage_dtype,
        )
        seconds = time.perf_counter() - t0
        self.shards_written.inc()
        self.items_written.inc(entry["count"])
        log.info("shard %s written: %d items in %.2f s", name, entry["count"], seconds)
        readmitted = sorted(self.forgotten.intersection(batch["ids"].tolist())) if self.forgotten else []
        yield {"name": name, "path": rel, "partition": part, **entry, "build_seconds": round(seconds, 3),
               "readmitted": readmitted}


def write_dead_letter(records, cfg: BuildConfig) -> dict:
    """The rejected rows as one Parquet file under ``deadletter/`` (none when every row was good)."""
    summary = {"count": len(records), "path": None,
               "reasons": dict(Counter(r["reason"].split(":")[0] for r in records).most_common(10))}
    if records:
        rel = f"deadletter/v{cfg.version:08d}.{cfg.token}.parquet"
        buf = pa.BufferOutputStream()
        pq.write_table(validate.dead_letter_table(records), buf)
        storage.write_bytes_atomic(storage.join(cfg.out, rel), buf.getvalue().to_pybytes())
        summary["path"] = storage.join(cfg.out, rel)
    return summary


def publish(entries, cfg: BuildConfig, dead: dict, router) -> dict:
    """Write the new version's manifest: the last step, reached only when every shard was written."""
    latest = mf.latest_version(cfg.out)
    if latest != cfg.parent_version:
        raise RuntimeError(f"{cfg.out} changed during the build (version {latest} was published meanwhile); "
                           "nothing was published: run the build again")
    if not entries:
        raise ValueError(f"no valid rows to publish ({dead['count']} rejected, see {dead['path']})")
    entries = sorted(entries, key=lambda e: (e["partition"], e["name"]))
    readmitted = {i for e in entries for i in e.pop("readmitted")}
    detail = {"items": sum(e["count"] for e in entries), "files": len(cfg.files), "dead_letter": dead}
    if cfg.parent_version is None:
        partitioning = {"method": cfg.partition, "num_shards": cfg.num_shards}
        if cfg.partition == "kmeans":
            partitioning.update(router)
        manifest = mf.new_manifest(
            version=cfg.version, dim=cfg.dim, class_names=list(cfg.class_names), backend=cfg.backend,
            shards=entries, encoder=cfg.encoder, partitioning=partitioning, change="build",
            extra={"change_detail": detail, "removed_count": 0,
                   "build": {"backend_params": cfg.backend_params, "storage_dtype": cfg.storage_dtype}},
        )
    else:
        parent = mf.read_manifest(cfg.out, cfg.parent_version)
        forget = "keep"
        if readmitted:
            old = removals.forget_list(cfg.out, parent)
            rows = [r for r in zip(old.column("id").to_pylist(), old.column("version").to_pylist(),
                                   old.column("reason").to_pylist()) if r[0] not in readmitted]
            forget = removals.write_table(cfg.out, removals.state_path(cfg.version, "forget.parquet", cfg.token),
                                          removals.forget_table(rows))
            detail["readmitted"] = len(readmitted)
        manifest = mutations.derive_manifest(parent, version=cfg.version, change="add", detail=detail,
                                             shards=parent["shards"] + entries, forget=forget,
                                             class_names=list(cfg.class_names))
    mf.write_manifest(cfg.out, manifest)
    log.info("published %s version %d: %d items in %d shards", cfg.out, cfg.version, detail["items"], len(entries))
    return {"version": cfg.version}


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


_ERROR_LINE = re.compile(r"\b(\w*(?:Error|Exception|BuildFailed)): (.+)")


def _cause(exc: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a (worker) exception, not Beam's wrapping."""
    text = str(exc)
    found = [m for line in text.splitlines() if (m := _ERROR_LINE.search(line))]
    return (f"{found[-1].group(1)}: {found[-1].group(2)}" if found else text.strip().splitlines()[-1])[:2000]


# Beam's DirectRunner first tries Prism, which it downloads from GitHub at run time, and falls back
# to its FnApiRunner when that fails. Our batch jobs always ran (and were tested) on the FnApiRunner,
# so the direct runner is asked for by that name: no download, no silent change of engine.
_DIRECT_NAMES = {"directrunner", "direct", "switchingdirectrunner"}


def pipeline_options(args=None) -> PipelineOptions:
    """Beam options; without a runner, the DirectRunner (its FnApiRunner) with one worker process per core."""
    args = list(args or [])
    if not any(a.startswith("--runner") for a in args):
        args = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                f"--direct_num_workers={os.cpu_count() or 1}", *args]
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == "--runner" and i + 1 < len(args):  # "--runner X" as two words
            a, i = f"--runner={args[i + 1]}", i + 1
        if a.startswith("--runner=") and a.split("=", 1)[1].lower() in _DIRECT_NAMES:
            a = "--runner=FnApiRunner"
        out.append(a)
        i += 1
    return PipelineOptions(out)


def run_pipeline(construct, pipeline_args, what: str) -> dict:
    """Run a pipeline to the end; a failure raises :class:`BuildFailed` with the cause's message."""
    t0 = time.perf_counter()
    try:
        p = beam.Pipeline(options=pipeline_options(pipeline_args))
        construct(p)
        result = p.run()
        result.wait_until_finish()
    except Exception as exc:  # noqa: BLE001 - Beam wraps worker errors; keep the worker's message
        raise BuildFailed(f"{what} failed, nothing was published: {_cause(exc)}") from exc
    counters = {}
    try:
        for c in result.metrics().query(MetricsFilter().with_namespace("vismem.build"))["counters"]:
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
    except Exception:  # noqa: BLE001 - some runners report no metrics; the manifest has the facts
        pass
    return {"seconds": round(time.perf_counter() - t0, 3), "counters": counters}


def summarise(out: str, version: int, parent: dict | None, run: dict) -> dict:
    """What a build or add did, from the manifest it published."""
    m = mf.read_manifest(out, version)
    old = {e["path"] for e in (parent or {}).get("shards", [])}
    new = [e for e in m["shards"] if e["path"] not in old]
    items = sum(e["count"] for e in new)
    nbytes = sum(f["bytes"] for e in new for f in e["files"].values())
    return {
        "memory": out, "version": version, "change": m["change"], "items_added": items,
        "items_total": m["count"] - m.get("removed_count", 0), "dead_letter": m["change_detail"]["dead_letter"],
        "shards": [{"name": e["name"], "count": e["count"], "build_seconds": e.get("build_seconds")} for e in new],
        "bytes_per_item": round(nbytes / max(items, 1), 1), "wall_seconds": run["seconds"], "counters": run["counters"],
    }


# ---- entry points ------------------------------------------------------------------------------------

def _check_classes(class_names):
    names = list(class_names or [])
    if not names:
        raise ValueError("a memory needs class names (--class-names a,b,c or a file with one per line)")
    if len(set(names)) != len(names):
        raise ValueError(f"class names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return tuple(names)


def build_memory(embeddings, out: str, *, num_shards: int, class_names, partition: str = "hash",
                 backend: str = "scann", backend_params: dict | None = None, storage_dtype: str = "float32",
                 norm_tolerance: float | None = 0.01, dim: int | None = None, kmeans_sample: int = 100_000,
                 kmeans_cells: int | None = None, seed: int = 0, batch_rows: int = 65536, pipeline_args=None) -> dict:
    """Build a new memory at ``out`` from embedding shards with Beam; returns a summary.

    Equal to ``memory.write_memory`` on the same valid rows (hash partitioning): the same shards,
    the same files, the same search results. Rows that fail validation go to
    ``out/deadletter/v00000001.TOKEN.parquet`` with a reason; the build goes on without them.

    Raises:
        ValueError: bad arguments, a memory already at ``out``, or no valid rows (BuildFailed).
        FileNotFoundError: no embedding shards match ``embeddings``.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partitioning {partition!r}; choose one of {', '.join(PARTITIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if int(num_shards) < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    if kmeans_cells is not None and int(kmeans_cells) < int(num_shards):
        raise ValueError(f"--kmeans-cells ({kmeans_cells}) must be at least --num-shards ({num_shards})")
    if storage_dtype not in ("float32", "float16"):
        raise ValueError(f"storage dtype must be float32 or float16, got {storage_dtype!r}")
    if mf.latest_version(out) is not None:
        raise ValueError(f"a memory already exists at {out} (version {mf.latest_version(out)}); "
                         "use 'vismem add' to add items to it")
    names = _check_classes(class_names)
    files = expand_inputs(embeddings)
    info = inspect_inputs(files)
    if dim is None:
        if not info["dims"]:
            raise ValueError(f"none of the {len(files)} embedding shards is readable")
        dim = info["dims"].most_common(1)[0][0]
    cfg = BuildConfig(out=out, version=1, token=mutations.new_token(), parent_version=None, files=tuple(files),
                      total_rows=info["rows"], dim=int(dim), class_names=names, num_shards=int(num_shards),
                      partition=partition, backend=backend, backend_params=dict(backend_params or {}),
                      storage_dtype=storage_dtype, norm_tolerance=norm_tolerance, batch_rows=batch_rows,
                      kmeans_sample=kmeans_sample, kmeans_cells=kmeans_cells, seed=seed, encoder=info["encoder"])
    log.info("building %s: %d files, %d rows, dim %d, %d %s shards, %s backend", out, len(files), info["rows"],
             cfg.dim, cfg.num_shards, partition, backend)
    run = run_pipeline(lambda p: build_pipeline(p, cfg), pipeline_args, "build")
    return summarise(out, cfg.version, None, run)


def add_to_memory(memory: str, embeddings, *, class_names=None, readmit: bool = False,
                  norm_tolerance: float | None = 0.01, batch_rows: int = 65536, pipeline_args=None) -> dict:
    """Add the rows of embedding shards to the latest version as new shards; publish a new version.

    New items go to the memory's partitions (hash of id, or nearest existing centroid) and the
    memory's backend and parameters. Rows whose id the memory already holds, or ever removed (the
    forget list; unless ``readmit``), go to the dead letter. ``class_names`` may extend the
    memory's classes (new classes appended at the end; existing ones keep their numbers).

    Raises:
        ValueError: a class list that does not extend the memory's, or no valid rows (BuildFailed).
        FileNotFoundError: no memory, or no embedding shards.
    """
    parent = mf.read_manifest(memory)
    names = list(parent["class_names"])
    if class_names:
        class_names = list(class_names)
        if class_names[:len(names)] != names:
            raise ValueError(f"--class-names must start with the memory's {len(names)} classes in order "
                             f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) and append new ones")
        names = _check_classes(class_names)
    files = expand_inputs(embeddings)
    info = inspect_inputs(files)
    if parent.get("encoder", {}).get("name") and info["encoder"] and info["encoder"] != parent["encoder"]:
        raise ValueError(f"the new embeddings come from {info['encoder']}, the memory from {parent['encoder']}")
    part = parent.get("partitioning", {})
    dead = removals.tombstones_by_shard(memory, parent)
    build = parent.get("build", {})
    dtype = build.get("storage_dtype") or next(
        (e["params"]["dtype"] for e in parent["shards"] if "dtype" in e.get("params", {})), "float32")
    version = mutations.next_version(memory)
    cfg = BuildConfig(
        out=memory, version=version, token=mutations.new_token(), parent_version=parent["version"],
        files=tuple(files), total_rows=info["rows"], dim=parent["dim"], class_names=tuple(names),
        num_shards=int(part.get("num_shards") or len(parent["shards"]) or 1), partition=part.get("method", "hash"),
        centroids=tuple(tuple(c) for c in part["centroids"]) if part.get("centroids") else None,
        cell_partitions=tuple(part["cell_partitions"]) if part.get("cell_partitions") else None,
        backend=parent["backend"], backend_params=dict(build.get("backend_params") or {}), storage_dtype=dtype,
        norm_tolerance=norm_tolerance, readmit=readmit, batch_rows=batch_rows,
        existing=tuple((e["path"], sorted(dead.get(e["path"], ()))) for e in parent["shards"]),
    )
    log.info("adding to %s (version %d): %d files, %d rows", memory, parent["version"], len(files), info["rows"])
    run = run_pipeline(lambda p: build_pipeline(p, cfg), pipeline_args, "add")
    return summarise(memory, version, parent, run)
