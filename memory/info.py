"""A memory's manifest in brief (version, format, backend, size, classes, shards) and its measured
bytes per item, on disk and in RAM, part by part.

Parts: ``index`` (a ScaNN tree's hashing codes, partitioner and config), ``reorder`` (ScaNN's copy
of the vectors it re-scores candidates on: float32, bfloat16 or int8), ``vectors`` (the shard's
stored copy in its storage mode: the exact backend's index, every backend's rebuild source) and
``items`` (the items table). On disk: the sizes of the files each version's manifest records (and
checks on every open). In RAM: one shard (the largest) is loaded in a fresh process; its index's
share is the growth of that process's resident memory while the backend loads (the exact
backend's index holds its stored copy), its items' share the size of the arrays a loaded shard
keeps (ids as Python strings, labels, weights).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from memory import manifest as mf

PARTS = ("index", "reorder", "vectors", "items")
REORDER_FILES = ("dataset.npy", "bfloat16_dataset.npy", "int8_dataset.npy", "int8_multipliers.npy", "dp_norms.npy")


def memory_info(memory_path: str, version: int | None = None, *, measure_ram: bool = True) -> dict:
    """The summary ``vismem info`` prints for ``version`` (default: the latest) of the memory at ``memory_path``."""
    m = mf.read_manifest(memory_path, version)
    out = {
        "memory": memory_path, "version": m.version, "versions": mf.list_versions(memory_path),
        "format_version": m.format_version, "backend": m.backend, "dim": m.dim,
        "count": m.count, "classes": len(m.class_names), "encoder": m.encoder,
        "storage": sorted({s.params.get("storage") or s.params.get("dtype") or "float32" for s in m.shards}),
        "recall": recall_summary(m.shards),
        "bytes_per_item": {"disk": disk_bytes_per_item(m.shards)},
        "shards": [{"name": s.name, "count": s.count, "params": s.params} for s in m.shards],
    }
    if measure_ram and m.shards:
        out["bytes_per_item"]["ram"] = ram_bytes_per_item(memory_path, max(m.shards, key=lambda s: s.count))
    return out


def part_of(rel: str) -> str:
    """Which part a shard file (path relative to the shard folder) belongs to."""
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith("scann/"):
        return "reorder" if name in REORDER_FILES else "index"
    return "items" if name.startswith("items") else "vectors"


def disk_bytes_per_item(shards) -> dict:
    """Bytes per item of each part over all ``shards``, from the file sizes their entries record."""
    items = sum(s.count for s in shards)
    sums = dict.fromkeys(PARTS, 0)
    for s in shards:
        for rel, f in s.files.items():
            sums[part_of(rel)] += f["bytes"]
    out = {p: round(v / max(items, 1), 1) for p, v in sums.items()}
    out["total"] = round(sum(sums.values()) / max(items, 1), 1)
    return out


def recall_summary(shards) -> dict | None:
    """The recall@10 (and @50) each shard measured against brute force at build time (``memory.tuning``)."""
    measured = [s for s in shards if "recall" in s.params]
    if not measured:
        return None
    weight = sum(s.count for s in measured)
    target = measured[0].params.get("target_recall")
    low = min(s.params["recall"] for s in measured)
    low50 = min(s.params.get("recall_at_50", 1.0) for s in measured)
    return {"target": target, "min": low, "min_at_50": low50,
            "reached": target is not None and min(low, low50) >= target,
            "mean": round(sum(s.params["recall"] * s.count for s in measured) / weight, 4),
            "shards_measured": len(measured)}


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; elsewhere psutil)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


def items_ram(ids, labels, weights) -> int:
    """Bytes a loaded shard's item columns hold: the arrays plus each id's string object."""
    return int(ids.nbytes + sum(sys.getsizeof(i) for i in ids) + labels.nbytes + weights.nbytes)


def ram_bytes_per_item(root: str, entry: mf.ShardEntry) -> dict:
    """Resident bytes per item of one shard loaded in a fresh Python process: index (RSS growth) and items.

    A fresh process, so memory this one freed earlier cannot be reused and hide the growth.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    code = "from memory.info import measure_loaded_shard; measure_loaded_shard()"
    run = subprocess.run([sys.executable, "-c", code], input=json.dumps({"root": root, "entry": entry.to_json()}),
                         capture_output=True, text=True, env=env, check=False)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"could not load shard {entry.name} to measure its RAM: {run.stderr.strip()[-500:]}")
    out = json.loads(lines[-1])
    n = max(entry.count, 1)
    result = {"index": round(out["index"] / n, 1), "items": round(out["items"] / n, 1)}
    result["total"] = round(result["index"] + result["items"], 1)
    result["measured_on"] = entry.name
    return result


def measure_loaded_shard() -> None:
    """Child side of :func:`ram_bytes_per_item`: ``{"root", "entry"}`` JSON on stdin, bytes on stdout."""
    from memory.backends import backend
    from memory.items import read_items_at
    from memory.shard import local_shard

    job = json.loads(sys.stdin.read())
    entry = mf.ShardEntry.from_json(job["entry"])
    backend(entry.backend)
    if entry.backend == "scann":
        import scann  # noqa: F401  (its library loads once per process, not per shard)
    with local_shard(job["root"], entry, verify=False) as local:
        items = read_items_at(local, ["id", "label", "weight"])
        ids = np.asarray(items.column("id").to_pylist(), dtype=object)
        labels = items.column("label").to_numpy().astype(np.int64)
        weights = items.column("weight").to_numpy().astype(np.float32)
        _trim()
        before = resident_bytes()
        index = backend(entry.backend).load(local, entry.params)
        _trim()  # what loading freed again (file buffers) is not the shard's
        grown = resident_bytes() - before
    print(json.dumps({"index": grown, "items": items_ram(ids, labels, weights), "rows": len(index)}), flush=True)
    # Skip the interpreter's teardown: Arrow's I/O threads can abort it there ("terminate called without an
    # active exception", apache/arrow#34314), after the figures are out; it once failed a fresh clone's suite.
    sys.stderr.flush()
    os._exit(0)


def _trim() -> None:
    """Hand freed heap pages back to the system (glibc), so a load's growth shows in the RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
