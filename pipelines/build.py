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
from pipelines.build_config import TARGET_SHARD_ITEMS, BuildConfig, default_num_shards
from pipelines.build_graph import build_pipeline
from pipelines.build_publish import find_published, summarise, unchanged_summary
from pipelines.progress import SILENT, MarkerWatch, marker_dir
from pipelines.validate import check_inputs

__all__ = ["BuildFailed", "add_to_memory", "build_memory"]
log = logging.getLogger("vismem.build")
PARTITIONS = ("hash", "kmeans")


def inspect_inputs(files: list[str]) -> dict:
    """What the Parquet footers say, without reading a row: row counts, dimensions, the encoder (an
    ``EncoderSpec`` or None), the class names the shards record (``class_names``, and the first file
    recording them, ``class_names_from``; None when none does) and the problems (``[(file, column or
    None, reason)]``: unreadable files, columns missing or of the wrong type, ``memory.schema.schema_problems``).

    Raises:
        ValueError: shards that disagree on their encoder or their class names (both files named).
    """
    rows, dims, specs, problems, file_dims, names = 0, Counter(), [], [], {}, []
    for f in files:
        fs, p = storage.filesystem(f)
        try:
            with fs.open(p, "rb") as fh:
                pf = pq.ParquetFile(fh)
                n = pf.metadata.num_rows
                arrow_schema = pf.schema_arrow
        except Exception as exc:  # noqa: BLE001 - any reason a footer cannot be read is the file's problem
            problems.append((f, None, _unreadable(fs, p, exc)))
            continue
        bad = schema.schema_problems(arrow_schema)
        problems += [(f, column, why) for column, why in bad]
        meta = {k.decode(): v.decode() for k, v in (arrow_schema.metadata or {}).items()}
        try:
            specs.append((f, EncoderSpec.from_metadata(meta)))
            names.append((f, schema.class_names_from_metadata(meta, f)))
        except ValueError as exc:
            problems.append((f, None, f"schema metadata: {exc}"))
        if any(column == "embedding" for column, _ in bad):
            continue
        rows += n
        d = arrow_schema.field("embedding").type.list_size
        dims[d] += n
        if n:
            file_dims[f] = d
    # Every shard against every other, field by field (memory.encoder_spec.agreed), both named on a mismatch.
    class_names, origin = schema.agreed_class_names(names)
    return {"rows": rows, "dims": dims, "encoder": agreed(specs), "problems": problems, "file_dims": file_dims,
            "class_names": class_names, "class_names_from": origin}


def _unreadable(fs, path: str, exc: Exception) -> str:
    try:
        if fs.size(path) == 0:
            return "empty file (0 bytes), not a Parquet file"
    except Exception:  # noqa: BLE001 - the first reason is the one to give
        pass
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"not a readable Parquet file ({first})"


def _check_classes(class_names):
    names = list(class_names or [])
    if not names:
        raise ValueError("a memory needs class names, and the embedding shards record none (shards from 'vismem "
                         "embed' do): pass --class-names a,b,c or a file with one per line")
    if len(set(names)) != len(names):
        raise ValueError(f"class names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return tuple(names)


def _names_differ(given, info: dict) -> ValueError:
    recorded = info["class_names"]
    return ValueError(f"--class-names {schema.describe_names(given, recorded)} differ from the class names the "
                      f"embedding shards record, {schema.describe_names(recorded, given)} (in "
                      f"{info['class_names_from']}), which their labels index: leave --class-names out to use them")


def _names_for_build(given, info: dict) -> tuple:
    """The memory's class names: ``given`` (``--class-names``), else those the shards record.

    Raises:
        ValueError: none either way, or ``given`` names that differ from the shards'.
    """
    recorded = info["class_names"]
    if given is None:
        return _check_classes(recorded)
    if recorded is not None and list(given) != recorded:
        raise _names_differ(given, info)
    return _check_classes(given)


def build_memory(embeddings, out: str, *, num_shards: int | None = None, class_names=None, partition: str = "hash",
                 backend: str = "scann", backend_params: dict | None = None, storage: str = "float32",
                 norm_tolerance: float | None = 0.01, dim: int | None = None, kmeans_sample: int | None = None,
                 kmeans_cells: int | None = None, seed: int = 0, batch_rows: int = 65536, pipeline_args=None,
                 target_recall: float | None = DEFAULT_TARGET_RECALL, tuning_queries: str | None = None,
                 storage_dtype: str | None = None, progress=SILENT, skip_bad_files: bool = False) -> dict:
    """Build a new memory at ``out`` from embedding shards with Beam; returns a summary.

    ``class_names``: default, the names the shards record (``vismem embed`` records its source's);
    given, they must equal those (when the shards record any). ``num_shards``: default
    :func:`~pipelines.build_config.default_num_shards` of the footers' row count.
    Equal to ``memory.write_memory`` on the same valid rows (hash partitioning): the same shards,
    the same files, the same search results. Rows that fail validation go to
    ``out/deadletter/v00000001.TOKEN.parquet`` with a reason; the build goes on without them.
    ``storage`` is the storage mode (``storage_dtype`` its older name); ``target_recall`` and
    ``tuning_queries`` (embedding shards of real queries) tune each shard (``memory.tuning``).
    Files whose footers show them unusable (unreadable, a column missing or of the wrong type, another
    dimension) are refused before the job, one problem each (``pipelines.validate.BadInputs``), unless
    ``skip_bad_files`` lets them through to the dead letter. ``progress`` (``pipelines.progress``)
    draws the job's stages.

    Raises:
        ValueError: bad arguments, bad input files (BadInputs), a memory already at ``out``, or no
            valid rows (BuildFailed).
        FileNotFoundError: no embedding shards at ``embeddings``.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partitioning {partition!r}; choose one of {', '.join(PARTITIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if num_shards is not None and int(num_shards) < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    if num_shards is not None and kmeans_cells is not None and int(kmeans_cells) < int(num_shards):
        raise ValueError(f"--kmeans-cells ({kmeans_cells}) must be at least --num-shards ({num_shards})")
    storage = quantize.check_mode(storage_dtype or storage, backend)
    check_target_recall(target_recall)
    if mf.latest_version(out) is not None:
        raise ValueError(f"a memory already exists at {out} (version {mf.latest_version(out)}); "
                         "use 'vismem add' to add items to it")
    if class_names is not None:
        _check_classes(class_names)
    files = schema.shard_files(embeddings)
    info = inspect_inputs(files)
    dim_from = "--dim is" if dim is not None else "most shards' dimension is"
    if dim is None and info["dims"]:
        dim = info["dims"].most_common(1)[0][0]
    check_inputs(info, int(dim or 0), embeddings, dim_from=dim_from, skip_bad_files=skip_bad_files)
    names = _names_for_build(class_names, info)
    shards_from = "" if num_shards is not None else f" (default: at most {TARGET_SHARD_ITEMS:,} items per shard)"
    num_shards = default_num_shards(info["rows"]) if num_shards is None else num_shards
    if kmeans_cells is not None and int(kmeans_cells) < int(num_shards):
        raise ValueError(f"--kmeans-cells ({kmeans_cells}) must be at least the number of shards ({num_shards})")
    cfg = BuildConfig(out=out, version=1, token=mutations.new_token(), parent_version=None, files=tuple(files),
                      total_rows=info["rows"], dim=int(dim), class_names=names, num_shards=int(num_shards),
                      partition=partition, backend=backend, backend_params=dict(backend_params or {}),
                      storage=storage, target_recall=target_recall, tuning_queries=tuning_queries,
                      norm_tolerance=norm_tolerance, batch_rows=batch_rows,
                      kmeans_sample=kmeans_sample, kmeans_cells=kmeans_cells, seed=seed,
                      encoder=info["encoder"].to_manifest() if info["encoder"] else {})
    log.info("building %s: %d files, %d rows, dim %d, %d %s shards, %s backend", out, len(files), info["rows"],
             cfg.dim, cfg.num_shards, partition, backend)
    classes_from = " (from --class-names)" if class_names is not None else " (recorded in the shards)"
    progress.note(f"inputs: {len(files)} file{'s' * (len(files) > 1)}, {info['rows']:,} rows, {cfg.dim}-d, "
                  f"{len(names)} classes{classes_from} -> {cfg.num_shards} {partition} shard"
                  f"{'s' * (cfg.num_shards > 1)}{shards_from}, {backend}")
    run = run_with_progress(cfg, pipeline_args, "build", progress)
    return summarise(out, cfg.token, cfg.version, run)


def run_with_progress(cfg: BuildConfig, pipeline_args, what: str, progress) -> dict:
    """Run the build graph of ``cfg``, its stages drawn by ``progress`` from the workers' markers."""
    stages = [("read", "read and check", len(cfg.files), cfg.total_rows, "rows"),
              ("write", "write shards", None, cfg.total_rows, "items")]
    if cfg.partition == "kmeans" and cfg.centroids is None:
        stages.insert(0, ("sample", "k-means sample", len(cfg.files), cfg.total_rows, "rows"))
    folder = marker_dir(cfg.out, cfg.version, cfg.token)
    try:
        with MarkerWatch(progress, folder, stages) as watch:
            run = run_pipeline(lambda p: build_pipeline(p, cfg), pipeline_args, what)
            c = run["counters"]
            watch.finish({"sample": c.get("rows_read"), "read": c.get("rows_read"), "write": c.get("items_written")})
    finally:
        storage.remove(folder, recursive=True)
    return run


def add_to_memory(memory: str, embeddings, *, class_names=None, readmit: bool = False,
                  norm_tolerance: float | None = 0.01, batch_rows: int = 65536, pipeline_args=None,
                  progress=SILENT, skip_bad_files: bool = False) -> dict:
    """Add the rows of embedding shards to the latest version as new shards; publish a new version.

    New items go to the memory's partitions (hash of id, or nearest existing centroid) and the
    memory's backend and parameters. Rows whose id the memory already holds, or ever removed (the
    forget list; unless ``readmit``), go to the dead letter. ``class_names`` may extend the
    memory's classes (new classes appended at the end; existing ones keep their numbers). When other
    writers publish while the add runs, it rebases onto the latest version at publish time
    (``pipelines.build_rebase``): ids forgotten or added meanwhile are tombstoned in its shards.
    Bad input files are refused at the door as in :func:`build_memory` (``skip_bad_files``, ``progress``).

    Raises:
        ValueError: a class list that does not extend the memory's, embeddings of another encoder,
            no valid rows, or class lists that grew apart while it ran (BuildFailed).
        FileNotFoundError: no memory, or no embedding shards.
    """
    token = mutations.new_token()
    # Refuse bad input before anything is written (the lease below is a file in the memory).
    _add_config(memory, mf.read_manifest(memory), embeddings, token, class_names=class_names, readmit=readmit,
                norm_tolerance=norm_tolerance, batch_rows=batch_rows, skip_bad_files=skip_bad_files)
    # The writer lease keeps gc off the parent (whose shards the add reads) and off this run's folders,
    # even when the add publishes at a later version than it began with (a rebase, build_rebase).
    with leases.writer_lease(memory, token, holder="vismem add") as parent:
        cfg = _add_config(memory, parent, embeddings, token, class_names=class_names, readmit=readmit,
                          norm_tolerance=norm_tolerance, batch_rows=batch_rows, skip_bad_files=skip_bad_files)
        log.info("adding to %s (version %d): %d files, %d rows", memory, parent.version, len(cfg.files),
                 cfg.total_rows)
        n = len(cfg.files)
        progress.note(f"inputs: {n} file{'s' * (n > 1)}, {cfg.total_rows:,} rows -> {memory} version {parent.version} "
                      f"({parent.live_count:,} items, {cfg.num_shards} partition{'s' * (cfg.num_shards > 1)})")
        run = run_with_progress(cfg, pipeline_args, "add", progress)
        if find_published(memory, token, cfg.version) is None:
            same = unchanged_summary(memory, cfg, run)
            if same is not None:
                return same
        return summarise(memory, token, cfg.version, run)


def _add_config(memory: str, parent: mf.Manifest, embeddings, token: str, *, class_names, readmit: bool,
                norm_tolerance, batch_rows: int, skip_bad_files: bool = False) -> BuildConfig:
    """The plain configuration of an add to ``parent``: its partitions, backend and id checks."""
    files = schema.shard_files(embeddings)
    info = inspect_inputs(files)
    names = _names_for_add(memory, parent.class_names, class_names, info)
    _check_encoder(memory, parent.encoder, info["encoder"])
    check_inputs(info, parent.dim, embeddings, dim_from="the memory's dimension is", skip_bad_files=skip_bad_files)
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


def _names_for_add(memory: str, names: list, given, info: dict) -> tuple:
    """The class names after an add: the memory's, extended by ``given`` (``--class-names``) or by the
    names the shards record. Shards whose recorded names neither equal nor extend the memory's are
    refused: their labels would name other classes."""
    recorded = info["class_names"]
    if recorded is None:
        return _extended_classes(names, given)
    if given is not None and list(given) != recorded:
        raise _names_differ(given, info)
    if recorded[:len(names)] != list(names):
        raise ValueError(f"the embedding shards record the classes {schema.describe_names(recorded, names)} (in "
                         f"{info['class_names_from']}), which neither are nor extend {memory}'s "
                         f"{schema.describe_names(names, recorded)}: their labels would name other classes")
    return _check_classes(recorded)


def _extended_classes(names: list, class_names) -> tuple:
    """The memory's class names, or ``class_names`` when they start with them and append new ones."""
    if not class_names:
        return tuple(names)
    class_names = list(class_names)
    if class_names[:len(names)] != list(names):
        raise ValueError(f"--class-names must start with the memory's {len(names)} classes in order "
                         f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) and append new ones")
    return _check_classes(class_names)
