"""The Beam compaction job (``vismem compact``): rewrite shards without their removed items.

The plan (``memory.mutations.plan_compaction``) names each partition to rewrite: one holding
tombstoned items, or spread over several shards by ``add``. One worker per partition reads its
shards' ``items.parquet`` and ``embeddings.npy`` (checksums verified), drops the removed rows and
writes one shard with ``memory.shard.write_shard``; the last step publishes a manifest without
those tombstones, on top of whatever version is latest by then (removals made meanwhile are moved
onto the new shards). The forget list stays, so removed ids cannot come back through ``add``.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import apache_beam as beam
import numpy as np

from memory import manifest as mf
from memory import leases, mutations, publishing, removals, schema, storage
from memory.items import ITEMS_FILE, read_items_at
from memory.shard import local_shard, read_local_vectors, shard_settings, shard_vector_files
from pipelines import validate
from pipelines.beam_runner import run_pipeline
from pipelines.build_graph import write_shard_attempt
from pipelines.build_publish import find_published, published_version
from pipelines.progress import SILENT, MarkerWatch, mark, marker_dir

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
    with local_shard(root, entry, [ITEMS_FILE, *shard_vector_files(entry)]) as local:  # checksums verified
        items = read_items_at(local)
        emb = read_local_vectors(local, entry)  # decoded from the shard's storage mode
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
        markers = marker_dir(c.root, c.version, c.token)
        if not len(rows["ids"]):
            log.info("partition %d: every item removed, no shard left", group["partition"])
            mark(markers, "rewrite", group["name"], 0)
            return
        entry = write_shard_attempt(c.root, c.version, c.token, group["name"], group["partition"], rows,
                                    backend=c.backend, backend_params=c.backend_params,
                                    **shard_settings(group["sources"][0]["entry"]), started=t0)
        log.info("shard %s compacted: %d items in %.2f s", group["name"], len(rows["ids"]), entry.build_seconds)
        mark(markers, "rewrite", group["name"], len(rows["ids"]))
        yield entry


def _carried(latest: mf.Manifest, parent_dead: dict, groups, entries, root: str) -> list:
    """Tombstones of ``latest`` on the shards this compaction rewrote that it did not drop (removals
    published while it ran), moved to the new shard of their partition: those items are in it."""
    rewritten = {s["entry"].path: g["partition"] for g in groups for s in g["sources"]}
    new_shard = {e.partition_number: e.path for e in entries}
    carried = []
    for shard, ids in removals.tombstones_by_shard(root, latest).items():
        if shard not in rewritten:
            continue
        for i in ids - parent_dead.get(shard, set()):
            if rewritten[shard] not in new_shard:  # cannot be: a live item was read into it
                raise RuntimeError(f"item {i} removed meanwhile has no rewritten shard to be tombstoned in")
            carried.append((new_shard[rewritten[shard]], i))
    return carried


def compacted_version(latest: mf.Manifest, cfg: CompactConfig, groups, entries, parent_dead: dict) -> mf.Manifest:
    """The compacted version on top of ``latest`` (the parent, or a version published meanwhile).

    Removals published meanwhile on the rewritten shards become tombstones on the new shards; shards
    other writers added are kept. A version that no longer holds every rewritten shard (another
    compaction replaced them) is a conflict this compaction gives up on.
    """
    rewritten = {s["entry"].path for g in groups for s in g["sources"]}
    lost = sorted(rewritten - {e.path for e in latest.shards})
    if lost:
        raise mf.ConcurrentUpdate(cfg.root, latest.version, f"a change that rewrote shard {lost[0]} ({len(lost)} "
                                  "of the shards this compaction rewrote); run compact again")
    left = removals.tombstones(cfg.root, latest)
    pairs = [(s, i) for s, i in zip(left.column("shard").to_pylist(), left.column("id").to_pylist())
             if s not in rewritten]
    carried = _carried(latest, parent_dead, groups, entries, cfg.root)
    version = latest.version + 1
    tombstones = removals.write_table(cfg.root, removals.state_path(version, "tombstones.parquet", cfg.token),
                                      removals.tombstones_table(pairs + carried)) if pairs or carried else None
    detail = {"partitions_rewritten": len(groups), "token": cfg.token,
              "items_dropped": sum(len(s["dead"]) for g in groups for s in g["sources"])}
    if latest.version != cfg.parent_version:
        detail["rebased"] = {"from": cfg.parent_version, "onto": latest.version, "tombstoned": len(carried)}
    return mutations.compacted_manifest(latest, groups, entries, version=version, tombstones=tombstones,
                                        detail=detail)


def publish_compaction(entries, cfg: CompactConfig, groups) -> int:
    """Publish the compacted version, written last; re-derived from the latest on a lost race."""
    done = find_published(cfg.root, cfg.token, cfg.version)
    if done is not None:  # a runner retrying this step after it published: publish nothing twice
        return done
    parent_dead = {s["entry"].path: set(s["dead"]) for g in groups for s in g["sources"]}
    _, manifest, _ = publishing.publish_derived(
        cfg.root, lambda latest: compacted_version(latest, cfg, groups, entries, parent_dead),
        what=f"compaction of {cfg.root}")
    return manifest.version


def compact_memory(root: str, *, merge: bool = True, pipeline_args=None, progress=SILENT) -> dict:
    """Rewrite the latest version's shards that hold removed items (and, with ``merge``, merge the
    shards ``add`` spread a partition over); publish the result as a new version.

    Removals and adds published while it runs are kept (see :func:`compacted_version`); a
    compaction published meanwhile makes this one give up (``BuildFailed``: run it again).
    Returns a summary; ``changed`` is False (and nothing is published) when there is nothing to do.
    ``progress`` (``pipelines.progress``) draws the rewrite.
    """
    token = mutations.new_token()
    with leases.writer_lease(root, token, holder="vismem compact") as parent:
        groups = mutations.plan_compaction(parent, removals.tombstones_by_shard(root, parent), merge=merge)
        if not groups:
            return {"memory": root, "version": parent.version, "changed": False}
        cfg = CompactConfig(root=root, version=parent.version + 1, token=token,
                            parent_version=parent.version, backend=parent.backend,
                            backend_params=dict((parent.build or {}).get("backend_params") or {}))
        log.info("compacting %s version %d: %d partitions to rewrite", root, parent.version, len(groups))

        def construct(p):
            (p | "Partitions" >> beam.Create(groups) | "Spread" >> beam.Reshuffle()
             | "Rewrite" >> beam.ParDo(CompactPartition(cfg)) | "Entries" >> beam.combiners.ToList()
             | "Publish" >> beam.Map(publish_compaction, cfg, groups))

        items = sum(s["entry"].count - len(s["dead"]) for g in groups for s in g["sources"])
        progress.note(f"{root} version {parent.version}: {len(groups)} partition{'s' * (len(groups) > 1)} to "
                      f"rewrite, {items:,} items kept")
        folder = marker_dir(root, cfg.version, token)
        try:
            with MarkerWatch(progress, folder, [("rewrite", "rewrite shards", None, items, "items")]) as watch:
                run = run_pipeline(construct, pipeline_args, "compact")
                watch.finish({})
        finally:
            storage.remove(folder, recursive=True)
    m = mf.read_manifest(root, published_version(root, token, cfg.version))
    return {"memory": root, "version": m.version, "changed": True, "partitions_rewritten": len(groups),
            "items_dropped": m.change_detail["items_dropped"], "items": m.live_count,
            "shards": len(m.shards), "wall_seconds": run["seconds"]}
