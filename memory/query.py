"""Classify a file of query embeddings against a memory; optionally write predictions with neighbours."""
from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import manifest as mf
from memory import confidence, output_paths, schema, storage, voting
from memory.encoder_spec import EncoderSpec, agreed, check_against_memory
from memory.memory import Memory

# Neighbour slots (queries x k) one search batch may hold: ~4M slots are ~100 MB with their ids. A
# large k shrinks the batch instead of allocating queries x k at once.
SLOTS_PER_BATCH = 1 << 22


def _bar(progress, n: int, step: int):
    if progress is not None:
        return contextlib.closing(progress.stage("query", total=n, unit="queries"))
    from tqdm import tqdm

    return tqdm(total=n, desc="query", unit="queries", disable=n <= step)


def query_memory(memory_path: str, queries_path: str, *, k: int = 50, method: str = "rank",
                 out: str | None = None, batch_size: int = 4096, version: int | None = None,
                 alpha: float = 2.0, tau: float = 0.07, xi: float = 1.0, probe_shards: int | None = None,
                 probe_margin: float | None = None, ties: str = "nearest", abstain_below: float | None = None,
                 where=None, progress=None) -> dict:
    """Classify every row of an embedding shard; write predictions with neighbours; return a summary.

    ``where`` (``memory.filters.ItemFilter``) votes with the nearest items it allows only; the
    summary names it. ``progress``: what draws the search (an object with ``stage(name, total,
    unit)`` returning a bar with ``update(n)`` and ``close()``, as ``pipelines.progress``; default: a
    bar on stderr).

    Every prediction carries its confidence (``Memory.classify``: the voted class's share of the
    vote); with ``abstain_below`` those below it are -1 and flagged ``abstained``. When the query rows
    carry labels (>= 0), the summary includes top-1 accuracy over them (an abstention counts as an
    error) and, with ``abstain_below``, the accuracy over the answered ones. Everything is checked
    before the memory is opened (:func:`read_queries`, ``k`` against the memory's live items, ``out``
    a file path); nothing is written unless the whole run succeeds.

    Raises:
        ValueError: ``k`` or ``batch_size`` below 1, ``k`` above the memory's live items, queries of
            another encoder or dimension, no query rows, labels outside the memory's classes, an
            ``out`` that is a folder, an unknown tie rule or ``abstain_below`` outside [0, 1].
        FileNotFoundError: no memory, no such version, or no query shards.
    """
    positive_ints(k=k, batch_size=batch_size)
    voting.check_ties(ties)
    confidence.check_abstain_below(abstain_below)
    manifest = mf.read_manifest(memory_path, version)
    if out:
        output_paths.check_file(out, "--out")
    queries = read_queries(queries_path, manifest, memory_path)
    check_k(k, manifest, memory_path)
    n, step = len(queries["ids"]), search_batch(batch_size, k)
    preds, conf, abstained = np.empty(n, np.int64), np.empty(n, np.float64), np.empty(n, bool)
    nb_ids, nb_labels, nb_sims = [], [], []
    with Memory.open(memory_path, manifest.version) as mem, _bar(progress, n, step) as bar:
        for start in range(0, n, step):
            res = mem.classify(queries["embeddings"][start:start + step], k, method,
                               alpha=alpha, tau=tau, xi=xi, probe_shards=probe_shards, probe_margin=probe_margin,
                               ties=ties, abstain_below=abstain_below, where=where)
            preds[start:start + step] = res.predictions
            conf[start:start + step] = res.confidence
            abstained[start:start + step] = res.abstained
            bar.update(len(res.predictions))
            if out:  # only --out needs every neighbour list at the end
                nb_ids.append(res.neighbours.ids)
                nb_labels.append(res.neighbours.labels)
                nb_sims.append(res.neighbours.sims)
        names = mem.class_names
        summary = {"memory": memory_path, "version": mem.version, "queries": n, "k": k, "method": method,
                   "ties": ties, "mean_confidence": float(conf.mean())}
        if where is not None:
            summary["filter"] = where.to_json()
    if abstain_below is not None:
        summary.update(abstain_below=abstain_below, abstained=int(abstained.sum()))
    labels = queries["labels"]
    known = labels >= 0
    if known.any():
        summary["labelled_queries"] = int(known.sum())
        summary["top1_accuracy"] = float((preds[known] == labels[known]).mean())
        if abstain_below is not None:  # None when every labelled query abstained
            answered = known & ~abstained
            summary["accuracy_answered"] = float((preds[answered] == labels[answered]).mean()) \
                if answered.any() else None
    if out:
        neighbours = (np.concatenate(nb_ids), np.concatenate(nb_labels), np.concatenate(nb_sims))
        _write_predictions(out, queries["ids"], preds, names, labels, neighbours, conf, abstained)
        summary["out"] = out
    return summary


def read_queries(path, manifest: mf.Manifest, memory: str, *, what: str = "queries",
                 check_labels: bool = True) -> dict:
    """The embedding shards at ``path`` (:func:`memory.schema.read_embeddings`, concatenated), checked
    against a memory's manifest before any search: shards that agree on their encoder, an encoder
    the memory's (name, version, image size, preprocessing), its dimension, at least one row and,
    with ``check_labels``, labels that index the memory's classes (-1: unknown).

    Raises:
        ValueError: any of those checks, or a file that is not a readable embedding shard.
        FileNotFoundError: no shards at ``path``.
    """
    files = schema.shard_files(path)
    parts = [_read_shard(f) for f in files]
    spec = agreed((f, EncoderSpec.from_metadata(p["metadata"])) for f, p in zip(files, parts))
    check_against_memory(manifest.encoder, spec, memory=memory, inputs_what=f"{what} {path}")
    data = schema.concat_embeddings(parts, where=str(path))
    n, dim = data["embeddings"].shape
    if dim != manifest.dim:
        raise ValueError(f"{what} must have shape (n, {manifest.dim}) for memory {memory}, got ({n}, {dim}) "
                         f"from {path}")
    if n == 0:
        raise ValueError(f"{what} {path} hold no rows: nothing to search")
    names = manifest.class_names
    top = int(data["labels"].max())
    if check_labels and top >= len(names):
        raise ValueError(f"{what} {path}: labels reach {top}, but memory {memory} has {len(names)} classes "
                         f"(labels 0..{len(names) - 1}, -1 unknown): were they numbered for another class list?")
    return data


def shards_encoder(path) -> EncoderSpec | None:
    """The encoder the embedding shards at ``path`` name, from their Parquet footers only
    (:func:`memory.encoder_spec.agreed`: shards that disagree are refused, both named)."""
    specs = []
    for f in schema.shard_files(path):
        fs, p = storage.filesystem(f)
        try:
            with fs.open(p, "rb") as fh:
                meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
        except pa.ArrowException as exc:
            raise ValueError(f"{f} is not a readable Parquet file: {exc}") from None
        specs.append((f, EncoderSpec.from_metadata({k.decode(): v.decode() for k, v in meta.items()})))
    return agreed(specs)


def _read_shard(path: str) -> dict:
    try:
        return schema.read_embeddings(path)
    except pa.ArrowException as exc:  # pyarrow names a buffer, not the file
        raise ValueError(f"{path} is not a readable Parquet file: {exc}") from None


def check_k(k: int, manifest: mf.Manifest, memory: str, option: str = "k") -> None:
    """Refuse ``k`` above the live items of a memory version: it could only return padding, and
    ``queries x k`` slots would be allocated for it."""
    if k > manifest.live_count:
        raise ValueError(f"{option} {k} exceeds the {manifest.live_count} live items of memory {memory} "
                         f"(version {manifest.version}); ask for at most {manifest.live_count}")


def positive_ints(**values) -> None:
    """Raise ValueError naming the first value that is not an integer >= 1."""
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def search_batch(batch_size: int, k: int) -> int:
    """Queries per search call: ``batch_size``, fewer when ``batch_size x k`` would exceed SLOTS_PER_BATCH."""
    return max(1, min(int(batch_size), SLOTS_PER_BATCH // max(int(k), 1)))


def _write_predictions(out: str, ids, preds: np.ndarray, names: list, labels: np.ndarray, neighbours: tuple,
                       conf: np.ndarray, abstained: np.ndarray) -> None:
    """One Parquet row per query: prediction (index and name), its confidence and whether it abstained
    (prediction -1), label, neighbour ids, labels and similarities."""
    nb_ids, nb_labels, nb_sims = neighbours
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "prediction": pa.array(preds, pa.int32()),
        "prediction_name": pa.array([names[p] if p >= 0 else None for p in preds], pa.string()),
        "confidence": pa.array(conf, pa.float64()),
        "abstained": pa.array(abstained, pa.bool_()),
        "label": pa.array(labels, pa.int32()),
        "neighbour_ids": pa.array(nb_ids.tolist(), pa.list_(pa.string())),
        "neighbour_labels": pa.array(nb_labels.tolist(), pa.list_(pa.int32())),
        "neighbour_sims": pa.array(nb_sims.tolist(), pa.list_(pa.float32())),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(out, sink.getvalue().to_pybytes())
