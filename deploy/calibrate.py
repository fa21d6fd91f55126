"""Calibrating ``vismem plan``: each storage mode measured, a ladder run, and the calibration file written.

Used by ``vismem plan --calibrate`` (a mini ladder on the user's machine) and ``benchmarks/scale.py``.
"""
from __future__ import annotations

import os
import time

import numpy as np

from deploy.ladder import (CLUSTERS, class_names, cluster_centres, draw_items, item_id, leaf_base, measure_point,
                           measured, open_rss, recall_at, synthetic_queries)


def _write_kwargs(mode: str) -> dict:
    """How this build of vismem takes a storage mode (``storage=``, or the older ``storage_dtype=``)."""
    import inspect

    from memory import write_memory

    if "storage" in inspect.signature(write_memory).parameters:
        return {"storage": mode}
    if mode in ("float32", "float16"):
        return {"storage_dtype": mode}
    raise ValueError(f"storage mode {mode!r} is not available in this build of vismem")


def measure_mode(work: str, mode: str, n: int, dim: int, *, queries: int = 2000, target: float = 0.95) -> dict:
    """One storage mode on one ScaNN shard of ``n`` synthetic items: bytes per item on disk and in RAM,
    build CPU seconds, CPU per query at the cheapest leaves setting reaching ``target`` (fastest of 3
    runs), and the highest recall@10 any setting reached."""
    import shutil

    from memory import Memory, write_memory

    rng = np.random.default_rng([dim, n])
    centres = cluster_centres(dim, 0)
    x, c = draw_items(rng, centres, n)
    out = os.path.join(work, f"mode-{mode}-n{n}-d{dim}")
    shutil.rmtree(out, ignore_errors=True)
    cpu = time.process_time()
    write_memory(out, x, c % CLUSTERS, [item_id(i) for i in range(n)], backend="scann", class_names=class_names(),
                 **_write_kwargs(mode))
    build_cpu = time.process_time() - cpu
    q = synthetic_queries(queries, dim, seed=0)
    s = q @ x.T
    truth = np.asarray([item_id(i) for i in np.argsort(-s, axis=1)[:, :10].ravel()], dtype=object).reshape(-1, 10)
    ram = open_rss(out)
    with Memory.open(out) as mem:
        base = leaf_base(mem)
        best, top = None, 0.0
        for f in (0.5, 1.0, 2.0, 4.0, 8.0) if base else (None,):
            leaves = max(1, round(base * f)) if base else None
            _, cpu_q, nb = measured(lambda: mem.search(q, 10, leaves_to_search=leaves), len(q), repeat=3)
            rec = recall_at(nb.ids, truth)
            top = max(top, rec)
            if rec >= target:
                best = {"recall@10": rec, "cpu_s_per_query": cpu_q / len(q), "leaves": leaves}
                break
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(out, "shards")) for f in fs)
    shutil.rmtree(out, ignore_errors=True)
    return {"mode": mode, "n": n, "dim": dim, "disk_bytes_per_item": disk / n, "ram_per_item": ram["added"] / n,
            "build_cpu_s": build_cpu, "query": best, "max_recall": top}


def measure_routing(dim: int = 128, cells: int = 1280, queries: int = 4096, repeat: int = 5) -> dict:
    """``{flops_per_cpu_s, ...}``: the rate of routing's one matrix product (queries x cells similarities,
    float32), CPU time, fastest of ``repeat``. ``vismem plan`` adds ``2 x cells x dim`` of it per query:
    at a billion items (20,000 cells of 768-d) routing costs more than the shard search itself."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    c = np.ascontiguousarray(rng.standard_normal((dim, cells)).astype(np.float32))
    q @ c  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        (q @ c).argmax(1)
        best = min(best, time.process_time() - t)
    flops = 2.0 * queries * cells * dim
    return {"flops_per_cpu_s": flops / max(best, 1e-9), "dim": dim, "cells": cells, "queries": queries,
            "cpu_s": best}


def measure_modes(work: str, modes, n: int, dims=(128, 512), log=print) -> list[dict]:
    """:func:`measure_mode` for every mode this build offers, at two dimensions (modes it lacks are skipped)."""
    out = []
    for mode in modes:
        for dim in dims:
            try:
                out.append(measure_mode(work, mode, n, dim))
            except ValueError as exc:
                log(f"storage mode {mode}: skipped ({exc})")
                break
            r = out[-1]
            log(f"mode {mode} dim {dim}: {r['disk_bytes_per_item']:,.0f} B/item on disk, "
                f"{r['ram_per_item']:,.0f} in RAM, "
                f"build {r['build_cpu_s']:.1f} CPU s")
    return out


def calibrate(out_path: str, work: str, *, sizes, shard_items: int, dim: int = 128, workers: int | None = None,
              queries: int = 1000, mode_items: int = 100_000, mode_dims=(128, 512),
              modes=("float32", "float16", "int8", "codes"), command: str = "", log=print) -> dict:
    """Measure a ladder (``sizes`` at ``shard_items`` per shard, plus one point at 4x the shard size) and the
    storage modes, then write the calibration file at ``out_path``; returns the calibration."""
    import json
    import platform

    import psutil

    from deploy.rates import calibration_from

    workers = workers or os.cpu_count() or 1
    sizes = sorted(int(s) for s in sizes)
    points = [measure_point(work, n, dim=dim, shard_items=shard_items, workers=workers, queries=queries, log=log)
              for n in sizes]
    big = min(4 * shard_items, sizes[len(sizes) // 2])
    if big > shard_items:  # the worker-RSS slope needs a second shard size
        points.append(measure_point(work, sizes[len(sizes) // 2], dim=dim, shard_items=big, workers=workers,
                                    queries=queries, log=log))
    mode_points = measure_modes(work, modes, mode_items, mode_dims, log=log)
    about = {"machine": {"cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
                         "cpu": platform.processor() or platform.machine()},
             "measured_at": time.strftime("%Y-%m-%d"), "command": command,
             "load_average": os.getloadavg()[0]}
    cal = calibration_from(points, mode_points, dim=dim, shard_items=shard_items, cores=workers, about=about,
                           routing=measure_routing(dim))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(cal, f, indent=1)
    return cal
