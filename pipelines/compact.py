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
import time

import apache_beam as beam
import numpy as np

from memory import manifest as mf
from memory import mutations, removals, schema
from memory.backends import EMBEDDINGS_FILE
from memory.items import ITEMS_FILE, read_items_at
from memory.shard import local_shard
from pipelines import validate
from pipelines.beam_runner import run_pipeline
from pipelines.build_graph import write_shard_attempt

log = logging.getLogger("vismem.compact")


@dataclasses.dataclass(frozen=True)
class CompactConfig:
    """What every compaction worker needs: plain values (it travels pickled to each)."""

    root: str
    version: int
    token: str
    parent_version: int
    backend: str
    backend_params: dict


def read_shard_rows(root: str, entry: mf.ShardEntry, dead) -> dict:
    """A shard's stored rows (ids, embeddings, labels, weights, provenance columns) minus the ``dead`` ids."""
    with local_shard(root, entry, [ITEMS_FILE, EMBEDDINGS_FILE]) as local:  # checksums verified
        items = read_items_at(local)
        emb = np.load(os.path.join(local, EMBEDDINGS_FILE))
    ids = np.asarray(items.column("id").to_pylist(), dtype=object)
    gone = set(dead)
    keep = np.fromiter((i not in gone for i in ids), dtype=bool, count=len(ids))
    rows = {c: np.asarray(items.column(c).to_pylist(), dtype=object)[keep] for c in schema.PROVENANCE_COLUMNS}
    rows["confidence"] = rows["confidence"].astype(np.float32)
    return {"ids": ids[keep], "embeddings": emb[keep], "labels": items.column("label").to_numpy()[keep],
            "weights": items.column("weight").to_numpy()[keep], **rows}


class CompactPartition(beam.DoFn):
    """One partition's shards in, one shard without removed items out (none if nothing is left)."""

    def __init__(self, cfg: CompactConfig):
        self.cfg = cfg

    def process(self, group):
        c = self.cfg
        t0 = time.perf_counter()
        parts = [read_shard_rows(c.root, s["entry"], s["dead"]) for s in group["sources"]]
        rows = validate.concat(parts)
        if not len(rows["ids"]):
            log.info("partition %d: every item removed, no shard left", group["partition"])
            return
        entry = write_shard_attempt(c.root, c.version, c.token, group["name"], group["partition"], rows,
                                    backend=c.backend, backend_params=c.backend_params,
                                    storage_dtype=str(parts[0]["embeddings"].dtype), started=t0)
        log.info("shard %s compacted: %d items in %.2f s", group["name"], len(rows["ids"]), entry.build_seconds)
        yield entry


def publish_compaction(entries, cfg: CompactConfig, groups) -> int:
    """The compacted version's manifest, written last: the tombstones of shards not rewritten stay."""
    latest = mf.latest_version(cfg.root)
    if latest != cfg.parent_version:
        raise RuntimeError(f"{cfg.root} changed during compaction (version {latest} was published meanwhile); "
                           "nothing was published: run compact again")
    parent = mf.read_manifest(cfg.root, cfg.parent_version)
    rewritten = {s["entry"].path for g in groups for s in g["sources"]}
    dropped = sum(len(s["dead"]) for g in groups for s in g["sources"])
    left = removals.tombstones(cfg.root, parent)
    pairs = [(s, i) for s, i in zip(left.column("shard").to_pylist(), left.column("id").to_pylist())
             if s not in rewritten]
    tombstones = removals.write_table(cfg.root, removals.state_path(cfg.version, "tombstones.parquet", cfg.token),
                                      removals.tombstones_table(pairs)) if pairs else None
    manifest = mutations.compacted_manifest(
        parent, groups, entries, version=cfg.version, tombstones=tombstones,
        detail={"partitions_rewritten": len(groups), "items_dropped": dropped})
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
        return {"memory": root, "version": parent.version, "changed": False}
    cfg = CompactConfig(root=root, version=mutations.next_version(root), token=mutations.new_token(),
                        parent_version=parent.version, backend=parent.backend,
                        backend_params=dict((parent.build or {}).get("backend_params") or {}))
    log.info("compacting %s version %d: %d partitions to rewrite", root, parent.version, len(groups))

    def construct(p):
        (p | "Partitions" >> beam.Create(groups) | "Spread" >> beam.Reshuffle()
         | "Rewrite" >> beam.ParDo(CompactPartition(cfg)) | "Entries" >> beam.combiners.ToList()
         | "Publish" >> beam.Map(publish_compaction, cfg, groups))

    run = run_pipeline(construct, pipeline_args, "compact")
    m = mf.read_manifest(root, cfg.version)
    return {"memory": root, "version": cfg.version, "changed": True, "partitions_rewritten": len(groups),
            "items_dropped": m.change_detail["items_dropped"], "items": m.live_count,
            "shards": len(m.shards), "wall_seconds": run["seconds"]}
