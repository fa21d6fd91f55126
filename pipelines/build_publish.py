"""Publishing a build or add: the dead letter, the new version's manifest (written last), the summary."""
from __future__ import annotations

import logging
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from memory import manifest as mf
from memory import mutations, removals, storage
from pipelines import validate
from pipelines.build_config import BuildConfig

log = logging.getLogger("vismem.build")


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


def publish(written, cfg: BuildConfig, dead: dict, router) -> dict:
    """Write the new version's manifest: the last step, reached only when every shard was written.

    ``written``: ``(ShardEntry, re-admitted ids)`` of every shard the workers wrote.
    """
    latest = mf.latest_version(cfg.out)
    if latest != cfg.parent_version:
        raise RuntimeError(f"{cfg.out} changed during the build (version {latest} was published meanwhile); "
                           "nothing was published: run the build again")
    if not written:
        raise ValueError(f"no valid rows to publish ({dead['count']} rejected, see {dead['path']})")
    written = sorted(written, key=lambda w: (w[0].partition, w[0].name))
    entries = [entry for entry, _ in written]
    readmitted = {i for _, ids in written for i in ids}
    detail = {"items": sum(e.count for e in entries), "files": len(cfg.files), "dead_letter": dead}
    if cfg.parent_version is None:
        manifest = _build_manifest(cfg, entries, detail, router)
    else:
        manifest = _add_manifest(cfg, entries, detail, readmitted)
    mf.write_manifest(cfg.out, manifest)
    log.info("published %s version %d: %d items in %d shards", cfg.out, cfg.version, detail["items"], len(entries))
    return {"version": cfg.version}


def _build_manifest(cfg: BuildConfig, entries: list, detail: dict, router) -> mf.Manifest:
    """A new memory's first manifest (k-means: with the router its workers partitioned by)."""
    partitioning = mf.Partitioning(cfg.partition, cfg.num_shards, **(router if cfg.partition == "kmeans" else {}))
    return mf.Manifest.new(
        version=cfg.version, dim=cfg.dim, class_names=list(cfg.class_names), backend=cfg.backend,
        shards=entries, encoder=cfg.encoder, partitioning=partitioning, change="build", change_detail=detail,
        removed_count=0, build={"backend_params": cfg.backend_params, "storage_dtype": cfg.storage_dtype},
    )


def _add_manifest(cfg: BuildConfig, entries: list, detail: dict, readmitted: set) -> mf.Manifest:
    """The parent's manifest plus the added shards; re-admitted ids leave the forget list."""
    parent = mf.read_manifest(cfg.out, cfg.parent_version)
    forget = "keep"
    if readmitted:
        old = removals.forget_list(cfg.out, parent)
        rows = [r for r in zip(old.column("id").to_pylist(), old.column("version").to_pylist(),
                               old.column("reason").to_pylist()) if r[0] not in readmitted]
        forget = removals.write_table(cfg.out, removals.state_path(cfg.version, "forget.parquet", cfg.token),
                                      removals.forget_table(rows))
        detail["readmitted"] = len(readmitted)
    return mutations.derive_manifest(parent, version=cfg.version, change="add", detail=detail,
                                     shards=[*parent.shards, *entries], forget=forget,
                                     class_names=list(cfg.class_names))


def summarise(out: str, version: int, parent: mf.Manifest | None, run: dict) -> dict:
    """What a build or add did, from the manifest it published."""
    m = mf.read_manifest(out, version)
    old = {e.path for e in parent.shards} if parent else set()
    new = [e for e in m.shards if e.path not in old]
    items = sum(e.count for e in new)
    nbytes = sum(f["bytes"] for e in new for f in e.files.values())
    return {
        "memory": out, "version": version, "change": m.change, "items_added": items,
        "items_total": m.live_count, "dead_letter": m.change_detail["dead_letter"],
        "shards": [{"name": e.name, "count": e.count, "build_seconds": e.build_seconds} for e in new],
        "bytes_per_item": round(nbytes / max(items, 1), 1), "wall_seconds": run["seconds"], "counters": run["counters"],
    }
