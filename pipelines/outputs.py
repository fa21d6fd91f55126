"""The output folder of an embedding run: shard names, atomic writes, completeness, the run's identity.

Layout (local path or ``gs://``)::

    OUT/run.json                                   what the run is (checked on every re-run)
    OUT/embeddings/shard-00003-of-00016.parquet    one embedding shard per input shard (DESIGN.md schema)
    OUT/errors/shard-00003-of-00016.parquet        quarantined inputs of that shard, with reasons (if any)
    OUT/summary.json                               counts, throughput, identities; written last

An input shard is complete when its embedding file exists: it is written under a temporary name and
renamed (one object on GCS), after its errors file, and carries its own counts in the Parquet schema
metadata (``vismem_stats``), so a resumed run can sum counts without recomputing anything.
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from memory import schema, storage

STATS_KEY = "vismem_stats"
ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("reason", pa.string()),
                           ("input_shard", pa.string()), ("source", pa.string())])


class OutputLayout:
    def __init__(self, out: str):
        self.out = str(out).rstrip("/")
        self.embeddings_dir = storage.join(self.out, "embeddings")
        self.errors_dir = storage.join(self.out, "errors")
        self.run_path = storage.join(self.out, "run.json")
        self.summary_path = storage.join(self.out, "summary.json")

    def shard_path(self, shard_name: str) -> str:
        return storage.join(self.embeddings_dir, f"{shard_name}.parquet")

    def errors_path(self, shard_name: str) -> str:
        return storage.join(self.errors_dir, f"{shard_name}.parquet")

    def check_run(self, identity: dict) -> None:
        """Record the run's identity, or refuse to mix two different runs in one folder.

        Raises:
            ValueError: ``OUT`` holds a run whose identity differs, naming the differing fields.
        """
        if storage.exists(self.run_path):
            old = json.loads(storage.read_bytes(self.run_path))
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            if diff:
                detail = "; ".join(f"{k}: {old.get(k)!r} there, {identity.get(k)!r} now" for k in diff)
                raise ValueError(f"{self.out} holds a different run ({detail}); resume with the same options "
                                 "or write to a new OUT")
            return
        storage.write_bytes_atomic(self.run_path, json.dumps(identity, indent=1, sort_keys=True).encode())

    def clean_temporaries(self) -> int:
        """Remove temporaries a killed run left behind (local only; object stores have none)."""
        if storage.is_remote(self.out):
            return 0
        removed = 0
        for d in (self.embeddings_dir, self.errors_dir):
            for name in storage.list_names(d):
                if ".tmp-" in name:
                    os.remove(os.path.join(storage.filesystem(d)[1], name))
                    removed += 1
        return removed

    def completed(self) -> dict:
        """``{shard name: stats}`` of complete embedding shards; unreadable files count as incomplete."""
        out = {}
        fs, _ = storage.filesystem(self.embeddings_dir)
        for name in storage.list_names(self.embeddings_dir):
            if not name.endswith(".parquet"):
                continue
            path = storage.join(self.embeddings_dir, name)
            try:
                with fs.open(storage.filesystem(path)[1], "rb") as f:
                    meta = pq.read_schema(f).metadata or {}
                out[name[: -len(".parquet")]] = {
                    **json.loads(meta[STATS_KEY.encode()]),
                    "metadata": {k.decode(): v.decode() for k, v in meta.items() if k != STATS_KEY.encode()},
                }
            except (OSError, KeyError, ValueError, pa.ArrowInvalid):
                continue
        return out

    def write_shard(self, shard_name: str, table: pa.Table, errors: list, stats: dict) -> None:
        """Errors first, then the embedding shard (whose appearance marks the input shard complete)."""
        if errors:
            cols = list(zip(*errors))
            err = pa.Table.from_arrays([pa.array(list(c), pa.string()) for c in cols], schema=ERRORS_SCHEMA)
            sink = pa.BufferOutputStream()
            pq.write_table(err, sink)
            storage.write_bytes_atomic(self.errors_path(shard_name), sink.getvalue().to_pybytes())
        meta = dict(table.schema.metadata or {})
        meta[STATS_KEY.encode()] = json.dumps(stats, sort_keys=True).encode()
        schema.write_embeddings(self.shard_path(shard_name), table.replace_schema_metadata(meta))

    def write_summary(self, summary: dict) -> None:
        storage.write_bytes_atomic(self.summary_path, json.dumps(summary, indent=1).encode())


def read_errors(out: str) -> pa.Table:
    """Every quarantined input of a run, one table (empty when nothing was quarantined)."""
    layout = OutputLayout(out)
    tables = []
    for name in storage.list_names(layout.errors_dir):
        if name.endswith(".parquet"):
            fs, p = storage.filesystem(storage.join(layout.errors_dir, name))
            with fs.open(p, "rb") as f:
                tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()


def read_run(out: str) -> dict:
    """All embedding shards of a run concatenated, in shard order (``memory.schema.read_embeddings`` form)."""
    layout = OutputLayout(out)
    parts = [schema.read_embeddings(storage.join(layout.embeddings_dir, n))
             for n in storage.list_names(layout.embeddings_dir) if n.endswith(".parquet")]
    if not parts:
        raise FileNotFoundError(f"no embedding shards under {layout.embeddings_dir}")
    return schema.concat_embeddings(parts, where=layout.embeddings_dir)
