"""Classify a file of query embeddings against a memory; optionally write predictions with neighbours."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import schema, storage
from memory.memory import Memory


def query_memory(memory_path: str, queries_path: str, *, k: int = 50, method: str = "rank",
                 out: str | None = None, batch_size: int = 4096, version: int | None = None,
                 alpha: float = 2.0, tau: float = 0.07, xi: float = 1.0, probe_shards: int | None = None) -> dict:
    """Classify every row of an embedding shard; write predictions with neighbours; return a summary.

    When the query rows carry labels (>= 0), the summary includes top-1 accuracy over them.
    """
    from tqdm import tqdm

    queries = schema.read_embedding_shards(queries_path)
    n = len(queries["ids"])
    preds = np.empty(n, np.int64)
    nb_ids, nb_labels, nb_sims = [], [], []
    with Memory.open(memory_path, version) as mem:
        for start in tqdm(range(0, n, batch_size), desc="query", unit="batch", disable=n <= batch_size):
            res = mem.classify(queries["embeddings"][start:start + batch_size], k, method,
                               alpha=alpha, tau=tau, xi=xi, probe_shards=probe_shards)
            preds[start:start + batch_size] = res.predictions
            nb_ids.append(res.neighbours.ids)
            nb_labels.append(res.neighbours.labels)
            nb_sims.append(res.neighbours.sims)
        names = mem.class_names
        summary = {"memory": memory_path, "version": mem.version, "queries": n, "k": k, "method": method}
    labels = queries["labels"]
    known = labels >= 0
    if known.any():
        summary["labelled_queries"] = int(known.sum())
        summary["top1_accuracy"] = float((preds[known] == labels[known]).mean())
    if out:
        neighbours = (np.concatenate(nb_ids), np.concatenate(nb_labels), np.concatenate(nb_sims))
        _write_predictions(out, queries["ids"], preds, names, labels, neighbours)
        summary["out"] = out
    return summary


def _write_predictions(out: str, ids, preds: np.ndarray, names: list, labels: np.ndarray, neighbours: tuple) -> None:
    """One Parquet row per query: prediction (index and name), label, neighbour ids, labels and similarities."""
    nb_ids, nb_labels, nb_sims = neighbours
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "prediction": pa.array(preds, pa.int32()),
        "prediction_name": pa.array([names[p] if p >= 0 else None for p in preds], pa.string()),
        "label": pa.array(labels, pa.int32()),
        "neighbour_ids": pa.array(nb_ids.tolist(), pa.list_(pa.string())),
        "neighbour_labels": pa.array(nb_labels.tolist(), pa.list_(pa.int32())),
        "neighbour_sims": pa.array(nb_sims.tolist(), pa.list_(pa.float32())),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(out, sink.getvalue().to_pybytes())
