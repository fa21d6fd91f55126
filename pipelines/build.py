"""Building a memory, or adding to one, with Beam (``vismem build`` / ``add``): the driver side.

The driver lists and inspects the embedding shards (Parquet footers only), checks the arguments,
fixes a plain :class:`~pipelines.build_config.BuildConfig` and runs the graph of
``pipelines.build_graph`` on the runner ``pipelines.beam_runner`` sets up from the Beam options.
"""
from __future__ import annotations

import logging
from collections import Counter

import pyarrow.parquet as pq

from memory import manifest as mf
from memory import leases, mutations, quantize, removals, schema, storage
from memory.backends import BACKENDS
from memory.encoder_spec import EncoderSpec, agreed
from memory.shard import DEFAULT_TARGET_RECALL, check_target_recall, shard_settings
from pipelines.beam_runner import BuildFailed, run_pipeline
from pipelines.build_config import BuildConfig
from pipelines.build_graph import build_pipeline
from pipelines.build_publish import find_published, summarise, unchanged_summary
from pipelines.validate import check_inputs

__all__ = ["BuildFailed", "add_to_memory", "build_memory"]
log = logging.getLogger("vismem.build")
PARTITIONS = ("hash", "kmeans")


def inspect_inputs(files: list[str]) -> dict:
    """Row counts, dimensions and the encoder (an ``EncoderSpec`` or None) from the Parquet footers only."""
    rows, dims, specs = 0, Counter(), []
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
        specs.append((f, EncoderSpec.from_metadata(meta)))
    # Every shard against every other, field by field (memory.encoder_spec.agreed), both named on a mismatch.
    return {"rows": rows, "dims": dims, "encoder": agreed(specs)}


def _check_classes(class_names):
    names = list(class_names or [])
    if not names:
        raise ValueError("a memory needs class names (--class-names a,b,c or a file with one per line)")
    if len(set(names)) != len(names):
        raise ValueError(f"class names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return tuple(names)


def build_memory(embeddings, out: str, *, num_shards: int, class_names, partition: str = "hash",
                 backend: str = "scann", backend_params: dict | None = None, storage: str = "float32",
                 norm_tolerance: float | None = 0.01, dim: int | None = None, kmeans_sample: int = 100_000,
                 kmeans_cells: int | None = None, seed: int = 0, batch_rows: int = 65536, pipeline_args=None,
                 target_recall: float | None = DEFAULT_TARGET_RECALL, tuning_queries: str | None = None,
                 storage_dtype: str | None = None) -> dict:
    """Build a new memory at ``out`` from embedding shards with Beam; returns a summary.

    Equal to ``memory.write_memory`` on the same valid rows (hash partitioning): the same shards,
    the same files, the same search results. Rows that fail validation go to
    ``out/deadletter/v00000001.TOKEN.parquet`` with a reason; the build goes on without them.
    ``storage`` is the storage mode (``storage_dtype`` its older name); ``target_recall`` and
    ``tuning_queries`` (embedding shards of real queries) tune each shard (``memory.tuning``).

    Raises:
        ValueError: bad arguments, a memory already at ``out``, or no valid rows (BuildFailed).
        FileNotFoundError: no embedding shards at ``embeddings``.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partitioning {partition!r}; choose one of {', '.join(PARTITIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if int(num_shards) < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    if kmeans_cells is not None and int(kmeans_cells) < int(num_shards):
        raise ValueError(f"--kmeans-cells ({kmeans_cells}) must be at least --num-shards ({num_shards})")
    storage = quantize.check_mode(storage_dtype or storage, backend)
    check_target_recall(target_recall)
    if mf.latest_version(out) is not None:
        raise ValueError(f"a memory already exists at {out} (version {mf.latest_version(out)}); "
                         "use 'vismem add' to add items to it")
    names = _check_classes(class_names)
    files = schema.shard_files(embeddings)
    info = inspect_inputs(files)
    if dim is None:
        if not info["dims"]:
            raise ValueError(f"none of the {len(files)} embedding shards is readable")
        dim = info["dims"].most_common(1)[0][0]
    check_inputs(info, int(dim), embeddings)
    cfg = BuildConfig(out=out, version=1, token=mutations.new_token(), parent_version=None, files=tuple(files),
                      total_rows=info["rows"], dim=int(dim), class_names=names, num_shards=int(num_shards),
                      partition=partition, backend=backend, backend_params=dict(backend_params or {}),
                      storage=storage, target_recall=target_recall, tuning_queries=tuning_queries,
                      norm_tolerance=norm_tolerance, batch_rows=batch_rows,
                      kmeans_sample=kmeans_sample, kmeans_cells=kmeans_cells, seed=seed,
                      encoder=info["encoder"].to_manifest() if info["encoder"] else {})
    log.info("building %s: %d files, %d rows, dim %d, %d %s shards, %s backend", out, len(files), info["rows"],
             cfg.dim, cfg.num_shards, partition, backend)
    run = run_pipeline(lambda p: build_pipeline(p, cfg), pipeline_args, "build")
    return summarise(out, cfg.token, cfg.version, run)


def add_to_memory(memory: str, embeddings, *, class_names=None, readmit: bool = False,
                  norm_tolerance: float | None = 0.01, batch_rows: int = 65536, pipeline_args=None) -> dict:
    """Add the rows of embedding shards to the latest version as new shards; publish a new version.

    New items go to the memory's partitions (hash of id, or nearest existing centroid) and the
    memory's backend and parameters. Rows whose id the memory already holds, or ever removed (the
    forget list; unless ``readmit``), go to the dead letter. ``class_names`` may extend the
    memory's classes (new classes appended at the end; existing ones keep their numbers). When other
    writers publish while the add runs, it rebases onto the latest version at publish time
    (``pipelines.build_rebase``): ids forgotten or added meanwhile are tombstoned in its shards.

    Raises:
        ValueError: a class list that does not extend the memory's, embeddings of another encoder,
            no valid rows, or class lists that grew apart while it ran (BuildFailed).
        FileNotFoundError: no memory, or no embedding shards.
    """
    token = mutations.new_token()
    # Refuse bad input before anything is written (the lease below is a file in the memory).
    _add_config(memory, mf.read_manifest(memory), embeddings, token, class_names=class_names, readmit=readmit,
                norm_tolerance=norm_tolerance, batch_rows=batch_rows)
    # The writer lease keeps gc off the parent (whose shards the add reads) and off this run's folders,
    # even when the add publishes at a later version than it began with (a rebase, build_rebase).
    with leases.writer_lease(memory, token, holder="vismem add") as parent:
        cfg = _add_config(memory, parent, embeddings, token, class_names=class_names, readmit=readmit,
                          norm_tolerance=norm_tolerance, batch_rows=batch_rows)
        log.info("adding to %s (version %d): %d files, %d rows", memory, parent.version, len(cfg.files),
                 cfg.total_rows)
        run = run_pipeline(lambda p: build_pipeline(p, cfg), pipeline_args, "add")
        if find_published(memory, token, cfg.version) is None:
            same = unchanged_summary(memory, cfg, run)
            if same is not None:
                return same
        return summarise(memory, token, cfg.version, run)


def _add_config(memory: str, parent: mf.Manifest, embeddings, token: str, *, class_names, readmit: bool,
                norm_tolerance, batch_rows: int) -> BuildConfig:
    """The plain configuration of an add to ``parent``: its partitions, backend and id checks."""
    names = _extended_classes(parent.class_names, class_names)
    files = schema.shard_files(embeddings)
    info = inspect_inputs(files)
    _check_encoder(memory, parent.encoder, info["encoder"])
    check_inputs(info, parent.dim, embeddings)
    part, build = parent.partitioning, parent.build or {}
    dead = removals.tombstones_by_shard(memory, parent)
    # The parent's storage mode and recall target, from its shards (older memories: the build dict).
    like = shard_settings(parent.shards[0]) if parent.shards else {
        "storage": build.get("storage_dtype") or "float32", "target_recall": DEFAULT_TARGET_RECALL}
    return BuildConfig(
        out=memory, version=parent.version + 1, token=token, parent_version=parent.version,
        files=tuple(files), total_rows=info["rows"], dim=parent.dim, class_names=tuple(names),
        num_shards=parent.num_partitions or 1, partition=part.method,
        centroids=tuple(tuple(c) for c in part.centroids) if part.centroids else None,
        cell_partitions=tuple(part.cell_partitions) if part.cell_partitions else None,
        backend=parent.backend, backend_params=dict(build.get("backend_params") or {}), **like,
        norm_tolerance=norm_tolerance, readmit=readmit, batch_rows=batch_rows,
        existing=tuple((e.path, sorted(dead.get(e.path, ()))) for e in parent.shards),
    )


def _check_encoder(memory: str, known: dict, new: EncoderSpec | None) -> None:
    """Refuse embeddings of another encoder than the memory's (fields either side leaves unknown pass)."""
    spec = EncoderSpec.from_manifest(known)
    if spec is None or new is None:
        return
    try:
        spec.check_compatible(new)
    except ValueError as exc:
        raise ValueError(f"cannot add to {memory} (the memory's encoder first, the new embeddings' second): "
                         f"{exc}") from None


def _extended_classes(names: list, class_names) -> tuple:
    """The memory's class names, or ``class_names`` when they start with them and append new ones."""
    if not class_names:
        return tuple(names)
    class_names = list(class_names)
    if class_names[:len(names)] != list(names):
        raise ValueError(f"--class-names must start with the memory's {len(names)} classes in order "
                         f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) and append new ones")
    return _check_classes(class_names)
