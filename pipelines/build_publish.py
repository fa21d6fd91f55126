"""Publishing a build or add: the dead letter, the new version's manifest (written last), the summary."""
from __future__ import annotations

import logging
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from memory import manifest as mf
from memory import publishing, removals, storage
from pipelines import build_rebase, validate
from pipelines.build_config import BuildConfig

log = logging.getLogger("vismem.build")
ALREADY_THERE = "id already in the memory"  # the start of memory.items.duplicate_reasons' reason


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


def rejected(dead: dict) -> str:
    """One line on a dead letter (``write_dead_letter``'s summary): how many rows, why, and where they are."""
    why = ", ".join(f"{reason} ({n:,})" for reason, n in dead["reasons"].items())
    more = "" if sum(dead["reasons"].values()) >= dead["count"] else ", ..."
    return f"{dead['count']:,} row{'s' * (dead['count'] != 1)} rejected: {why}{more}; see {dead['path']}"


def publish(written, cfg: BuildConfig, dead: dict, router) -> dict:
    """Publish the new version's manifest: the last step, reached only when every shard was written.

    ``written``: ``(ShardEntry, re-admitted ids)`` of every shard the workers wrote. A build creates
    version 1 (``ConcurrentUpdate`` if another build did first). An add derives from the latest
    version: when other writers published during the add, it rebases onto their version
    (``memory.publishing``): its shards do not depend on removals made meanwhile, but an id
    forgotten or added by them since the add's parent is tombstoned in the add's shards.
    """
    if not written:
        if cfg.parent_version is not None and nothing_new(dead):
            log.info("every row of the add is already in %s: nothing to publish", cfg.out)
            return {"version": None}
        raise ValueError(f"no valid rows to publish: {rejected(dead)}")
    done = find_published(cfg.out, cfg.token, cfg.version)
    if done is not None:  # a runner retrying this step after it published: publish nothing twice
        return {"version": done}
    written = sorted(written, key=lambda w: (w[0].partition, w[0].name))
    entries = [entry for entry, _ in written]
    for e in entries:  # a writer lease kept gc away; say so plainly if something else removed them
        if not storage.exists(storage.join(cfg.out, e.path)):
            raise RuntimeError(f"shard folder {e.path} of this run vanished from {cfg.out}; nothing was published")
    readmitted = {i for _, ids in written for i in ids}
    detail = {"items": sum(e.count for e in entries), "files": len(cfg.files), "dead_letter": dead,
              "token": cfg.token}
    if cfg.parent_version is None:
        mf.publish(cfg.out, _build_manifest(cfg, entries, detail, router))
        version = cfg.version
    else:
        parent = mf.read_manifest(cfg.out, cfg.parent_version)
        rebase = build_rebase.Rebase(cfg, parent, entries, readmitted)
        _, manifest, _ = publishing.publish_derived(
            cfg.out, lambda latest: rebase.manifest(latest, dict(detail)), what=f"add to {cfg.out}")
        version = manifest.version
    log.info("published %s version %d: %d items in %d shards", cfg.out, version, detail["items"], len(entries))
    return {"version": version}


def nothing_new(dead: dict) -> bool:
    """Every row was rejected only because the memory holds its id already (an add run again, say
    after a crash that came once it had published): an add then changes nothing and fails nothing."""
    return dead["count"] > 0 and all(r.startswith(ALREADY_THERE) for r in dead["reasons"])


def unchanged_summary(out: str, cfg: BuildConfig, run: dict) -> dict | None:
    """The summary of an add that found every row already in the memory, or None for another outcome."""
    path = storage.join(out, f"deadletter/v{cfg.version:08d}.{cfg.token}.parquet")
    if not storage.exists(path):
        return None
    reasons = pq.read_table(pa.BufferReader(storage.read_bytes(path)), columns=["reason"]).column("reason").to_pylist()
    dead = {"count": len(reasons), "path": path,
            "reasons": dict(Counter(r.split(":")[0] for r in reasons).most_common(10))}
    if not nothing_new(dead):
        return None
    latest = mf.read_manifest(out)
    return {"memory": out, "version": latest.version, "change": None, "changed": False, "items_added": 0,
            "items_total": latest.live_count, "dead_letter": dead,
            "note": f"all {len(reasons)} rows' ids are already in the memory, nothing was published (an add "
                    "run again after it published?); to replace an item, `vismem remove` it first",
            "wall_seconds": run["seconds"], "counters": run["counters"]}


def _build_manifest(cfg: BuildConfig, entries: list, detail: dict, router) -> mf.Manifest:
    """A new memory's first manifest (k-means: with the router its workers partitioned by)."""
    partitioning = mf.Partitioning(cfg.partition, cfg.num_shards, **(router if cfg.partition == "kmeans" else {}))
    return mf.Manifest.new(
        version=cfg.version, dim=cfg.dim, class_names=list(cfg.class_names), backend=cfg.backend,
        shards=entries, encoder=cfg.encoder, partitioning=partitioning, change="build", change_detail=detail,
        removed_count=0, build={"backend_params": cfg.backend_params, "storage_dtype": cfg.storage_dtype},
    )


def find_published(out: str, token: str, since: int) -> int | None:
    """The version a build, add or compaction with ``token`` published (from ``since`` on), or None."""
    for v in reversed(mf.list_versions(out)):
        if v < since:
            return None
        try:
            if (mf.read_manifest(out, v).change_detail or {}).get("token") == token:
                return v
        except FileNotFoundError:
            continue  # collected meanwhile: not this run's (gc keeps the latest)
    return None


def published_version(out: str, token: str, since: int) -> int:
    """The version a run with ``token`` published (it may have rebased past ``since``)."""
    version = find_published(out, token, since)
    if version is None:
        raise RuntimeError(f"the run with token {token} published no version of {out}")
    return version


def summarise(out: str, token: str, since: int, run: dict) -> dict:
    """What a build or add did, from the manifest it published (found by its token, from ``since`` on)."""
    version = published_version(out, token, since)
    m = mf.read_manifest(out, version)
    new = [e for e in m.shards if f".{token}/" in e.path]
    dead = removals.tombstones_by_shard(out, m)
    items = sum(e.count - len(dead.get(e.path, ())) for e in new)
    nbytes = sum(f["bytes"] for e in new for f in e.files.values())
    out_ = {
        "memory": out, "version": version, "change": m.change, "changed": True, "items_added": items,
        "items_total": m.live_count, "dead_letter": m.change_detail["dead_letter"],
        "shards": [{"name": e.name, "count": e.count, "build_seconds": e.build_seconds} for e in new],
        "bytes_per_item": round(nbytes / max(items, 1), 1), "wall_seconds": run["seconds"], "counters": run["counters"],
    }
    if "rebased" in m.change_detail:
        out_["rebased"] = m.change_detail["rebased"]
    return out_
