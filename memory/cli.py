"""Command-line verbs of the memory: ``vismem query`` and ``vismem info``. Thin maps onto functions."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import schema, storage, voting
from memory.memory import Memory


def query_memory(memory_path: str, queries_path: str, *, k: int = 50, method: str = "rank",
                 out: str | None = None, batch_size: int = 4096, version: int | None = None,
                 alpha: float = 2.0, tau: float = 0.07, xi: float = 1.0, probe_shards: int | None = None) -> dict:
    """Classify every row of an embedding shard; write predictions with neighbours; return a summary.

    When the query rows carry labels (>= 0), the summary includes top-1 accuracy over them.
    """
    from tqdm import tqdm

    queries = schema.read_embedding_shards(queries_path)
    with Memory.open(memory_path, version) as mem:
        n = len(queries["ids"])
        preds = np.empty(n, np.int64)
        nb_ids, nb_labels, nb_sims = [], [], []
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
        ids = np.concatenate(nb_ids)
        table = pa.table({
            "id": pa.array(queries["ids"], pa.string()),
            "prediction": pa.array(preds, pa.int32()),
            "prediction_name": pa.array([names[p] if p >= 0 else None for p in preds], pa.string()),
            "label": pa.array(labels, pa.int32()),
            "neighbour_ids": pa.array(ids.tolist(), pa.list_(pa.string())),
            "neighbour_labels": pa.array(np.concatenate(nb_labels).tolist(), pa.list_(pa.int32())),
            "neighbour_sims": pa.array(np.concatenate(nb_sims).tolist(), pa.list_(pa.float32())),
        })
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes_atomic(out, sink.getvalue().to_pybytes())
        summary["out"] = out
    return summary


def memory_info(memory_path: str, version: int | None = None) -> dict:
    from memory import manifest as mf

    m = mf.read_manifest(memory_path, version)
    return {
        "memory": memory_path, "version": m["version"], "versions": mf.list_versions(memory_path),
        "format_version": m["format_version"], "backend": m["backend"], "dim": m["dim"],
        "count": m["count"], "classes": len(m["class_names"]), "encoder": m["encoder"],
        "shards": [{"name": s["name"], "count": s["count"], "params": s["params"]} for s in m["shards"]],
    }


def add_parsers(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "query", help="classify query embeddings against a memory",
        description="Classify every row of QUERIES (an embedding shard in the DESIGN.md schema) by its k "
        "nearest neighbours in MEMORY and a voting rule. Prints a JSON summary (with top-1 accuracy "
        "when the queries carry labels) and, with --out, writes one row per query: prediction, "
        "neighbour ids, labels and similarities.",
        epilog="example: vismem query /data/fmnist-memory test.parquet --k 50 --method rank --out preds.parquet",
    )
    q.add_argument("memory", help="memory directory or gs:// URL")
    q.add_argument("queries", help="embedding shard(s) with the query embeddings: a Parquet file, a folder, or a glob")
    q.add_argument("--k", type=int, default=50, help="neighbours that vote (default 50)")
    q.add_argument("--method", choices=voting.METHODS, default="rank", help="voting rule (default rank)")
    q.add_argument("--alpha", type=float, default=2.0, help="rank voting offset: w = 1/(alpha + rank)")
    q.add_argument("--tau", type=float, default=0.07, help="softmax voting temperature")
    q.add_argument("--xi", type=float, default=1.0, help="distance voting exponent")
    q.add_argument("--version", type=int, default=None, help="memory version to pin (default latest)")
    q.add_argument("--batch-size", type=int, default=4096, help="queries per search batch")
    q.add_argument("--probe-shards", type=int, default=None,
                   help="k-means memories: search each query only in the P shards holding its most similar k-means cells")
    q.add_argument("--out", default=None, help="write predictions + neighbours to this Parquet file")
    q.set_defaults(func=lambda a: query_memory(
        a.memory, a.queries, k=a.k, method=a.method, out=a.out, batch_size=a.batch_size,
        version=a.version, alpha=a.alpha, tau=a.tau, xi=a.xi, probe_shards=a.probe_shards))

    i = sub.add_parser("info", help="show a memory's manifest summary",
                       description="Print a memory's version, format, backend, classes and shards as JSON.")
    i.add_argument("memory", help="memory directory or gs:// URL")
    i.add_argument("--version", type=int, default=None, help="version (default latest)")
    i.set_defaults(func=lambda a: memory_info(a.memory, a.version))


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
