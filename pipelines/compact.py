"""The Beam compaction job (``vismem compact``): rewrite shards without their removed items.

The plan (``memory.mutations.plan_compaction``) names each partition to rewrite: one holding
tombstoned items, or spread over several shards by ``add``. One worker per partition reads its
shards' ``items.parquet`` and ``embeddings.npy`` (checksums verified), drops the removed rows and
writes one shard with ``memory.shard.write_shard``; the last step publishes a manifest without
those tombstones. The forget list stays, so removed ids cannot come back through ``add``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq

from memory import manifest as mf
from memory import mutations, removals, schema, storage
from memory.backends import EMBEDDINGS_FILE
from memory.manifest import MemoryFormatError
from memory.shard import ITEMS_FILE, write_shard
from pipelines.build import run_pipeline

log = logging.getLogger("vismem.compact")


@dataclasses.dataclass(frozen=True)
class CompactConfig:
    root: str
    version: int
    token: str
    parent_version: int
    backend: str
    backend_params: dict


def read_shard_rows(root: str, entry: dict, dead) -> dict:
    """A shard's stored rows (vectors, ids, labels, weights, provenance) minus the ``dead`` ids."""
    src = storage.join(root, entry["path"])
    files = [ITEMS_FILE, EMBEDDINGS_FILE]
    local = storage.fetch_dir(src, files)
    try:
        for rel in files:
            want = entry["files"][rel]
            path = os.path.join(local, rel)
            if os.path.getsize(path) != want["bytes"] or storage.sha256_file(path) != want["sha256"]:
                raise MemoryFormatError(f"shard {entry['name']} at {src} is corrupt: {rel} does not match its checksum")
        items = pq.read_table(os.path.join(local, ITEMS_FILE))
        emb = np.load(os.path.join(local, EMBEDDINGS_FILE))
    finally:
        if storage.is_remote(src):
            shutil.rmtree(local, ignore_errors=True)
    ids = np.asarray(items.column("id").to_pylist(), dtype=object)
    gone = set(dead)
    keep = np.fromiter((i not in gone for i in ids), dtype=bool, count=len(ids))
    cols = {c: np.asarray(items.column(c).to_pylist(), dtype=object)[keep] for c in schema.PROVENANCE_COLUMNS}
    cols["confidence"] = cols["confidence"].astype(np.float32)
    return {"ids": ids[keep], "embeddings": emb[keep], "labels": items.column("label").to_numpy()[keep],
            "weights": items.column("weight").to_numpy()[keep], "provenance": cols, "dtype": str(emb.dtype)}


class CompactPartition(beam.DoFn):
    """One partition's shards in, one shard without removed items out (none if nothing is left)."""

    def __init__(self, cfg: CompactConfig):
        self.cfg = cfg

    def process(self, group):
        c = self.cfg
        t0 = time.perf_counter()
        parts = [read_shard_rows(c.root, s["entry"], s["dead"]) for s in group["sources"]]
        n = sum(len(p["ids"]) for p in parts)
        if n == 0:
            log.info("partition %d: every item removed, no shard left", group["partition"])
            return
        # A folder per attempt (see pipelines.build.WriteShard): retried bundles never share one.
        rel = f"shards/v{c.version:08d}.{c.token}/{group['name']}.{uuid.uuid4().hex[:8]}"
        entry = write_shard(
            storage.join(c.root, rel), np.concatenate([p["embeddings"] for p in parts]),
            np.concatenate([p["ids"] for p in parts]), np.concatenate([p["labels"] for p in parts]),
            backend_name=c.backend, weights=np.concatenate([p["weights"] for p in parts]),
            provenance={k: np.concatenate([p["provenance"][k] for p in parts]) for k in schema.PROVENANCE_COLUMNS},
            backend_params=c.backend_params or None, storage_dtype=parts[0]["dtype"],
        )
        seconds = time.perf_counter() - t0
        log.info("shard %s compacted: %d items in %.2f s", group["name"], n, seconds)
        yield {"name": group["name"], "path": rel, "partition": group["partition"], **entry,
               "build_seconds": round(seconds, 3)}


def publish_compaction(entries, cfg: CompactConfig, groups) -> int:
    latest = mf.latest_version(cfg.root)
    if latest != cfg.parent_version:
        raise RuntimeError(f"{cfg.root} changed during compaction (version {latest} was published meanwhile); "
                           "nothing was published: run compact again")
    parent = mf.read_manifest(cfg.root, cfg.parent_version)
    rewritten = {s["entry"]["path"] for g in groups for s in g["sources"]}
    dropped = sum(len(s["dead"]) for g in groups for s in g["sources"])
    detail = {"partitions_rewritten": len(groups), "items_dropped": dropped}
    manifest = mutations.compacted_manifest(parent, groups, entries, version=cfg.version, detail=detail)
    left = removals.tombstones(cfg.root, parent)
    pairs = [(s, i) for s, i in zip(left.column("shard").to_pylist(), left.column("id").to_pylist())
             if s not in rewritten]
    if pairs:
        manifest["tombstones"] = removals.write_table(
            cfg.root, removals.state_path(cfg.version, "tombstones.parquet", cfg.token), removals.tombstones_table(pairs))
        manifest["removed_count"] = len(pairs)
    mf.write_manifest(cfg.root, manifest)
    return cfg.version


def compact_memory(root: str, *, merge: bool = True, pipeline_args=None) -> dict:
    """Rewrite the latest version's shards that hold removed items (and, with ``merge``, merge the
    shards ``add`` spread a partition over); publish the result as a new version.

    Returns a summary; ``changed`` is False (and nothing is published) when there is nothing to do.
    """
    parent = mf.read_manifest(root)
    groups = mutations.plan_compaction(parent, removals.tombstones_by_shard(root, parent), merge=merge)
    if not groups:
        return {"memory": root, "version": parent["version"], "changed": False}
    cfg = CompactConfig(root=root, version=mutations.next_version(root), token=mutations.new_token(),
                        parent_version=parent["version"], backend=parent["backend"],
                        backend_params=dict(parent.get("build", {}).get("backend_params") or {}))
    log.info("compacting %s version %d: %d partitions to rewrite", root, parent["version"], len(groups))

    def construct(p):
        (p | "Partitions" >> beam.Create(groups) | "Spread" >> beam.Reshuffle()
         | "Rewrite" >> beam.ParDo(CompactPartition(cfg)) | "Entries" >> beam.combiners.ToList()
         | "Publish" >> beam.Map(publish_compaction, cfg, groups))

    run = run_pipeline(construct, pipeline_args, "compact")
    m = mf.read_manifest(root, cfg.version)
    return {"memory": root, "version": cfg.version, "changed": True, "partitions_rewritten": len(groups),
            "items_dropped": m["change_detail"]["items_dropped"], "items": m["count"] - m.get("removed_count", 0),
            "shards": len(m["shards"]), "wall_seconds": run["seconds"]}
