"""The build's k-means step alone: peak RSS and time of the one worker that trains the router.

Run: ``.venv/bin/python benchmarks/kmeans_step.py`` (``--help``). For each shard count, the default
sample (``memory.partition.default_sample``: 256 rows per cell, 100k to 1M rows) of clustered unit
vectors is staged in files as the build stages it (``pipelines.build_stage.write_sample``, one file
per input file), then a fresh process reads and trains on them exactly as the build's ``KMeans``
step does (``pipelines.build_graph.train_centroids``). Its peak RSS above the RSS it had before
reading is set beside what ``vismem plan`` computes for that step (one float32 copy of the sample
and a block of similarities): the plan's ``kmeans_worker_ram`` row. Writes
``bench-out/kmeans_step.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

from deploy.ladder import cluster_centres, draw_items  # noqa: E402
from memory.partition import BLOCK_SIMILARITIES, default_cells, default_sample  # noqa: E402
from pipelines.build_stage import write_sample  # noqa: E402

CHILD = """
import json, os, sys, time, types
import psutil
from pipelines.build_graph import train_centroids
paths = sys.argv[1].split(",")
cfg = types.SimpleNamespace(kmeans_cells=None, num_shards=int(sys.argv[2]), dim=int(sys.argv[3]), seed=0)
before = psutil.Process().memory_info().rss
t, c = time.perf_counter(), time.process_time()
router = train_centroids(paths, cfg)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork and exec)
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"before": before, "peak": peak,
                  "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                  "cells": len(router["centroids"])}), flush=True)
os._exit(0)
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="8,80", help="shard counts, comma separated (80: the 10M ladder point)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--files", type=int, default=40, help="staged sample files (one per input file)")
    ap.add_argument("--out", default="bench-out/kmeans_step.json")
    args = ap.parse_args(argv)
    rows = []
    for shards in (int(s) for s in args.shards.split(",")):
        sample = default_sample(shards)
        cells = default_cells(shards, sample)
        with tempfile.TemporaryDirectory(prefix="vismem-kmeans-") as work:
            x, _ = draw_items(np.random.default_rng(0), cluster_centres(args.dim, 0), sample)
            paths = [write_sample(work, part) for part in np.array_split(x, args.files)]
            del x
            env = {**os.environ, "PYTHONPATH": ROOT}
            r = subprocess.run([sys.executable, "-c", CHILD, ",".join(paths), str(shards), str(args.dim)],
                               capture_output=True, text=True, env=env, check=True)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        model = 4 * sample * args.dim + 4 * BLOCK_SIMILARITIES
        row = {"shards": shards, "sample_rows": sample, "cells": got["cells"], "dim": args.dim,
               "added_bytes": got["peak"] - got["before"], "model_bytes": model, **got}
        row["error"] = model / row["added_bytes"] - 1
        rows.append(row)
        print(f"{shards} shards: {sample:,} rows x {args.dim}, {got['cells']:,} cells: peak +{row['added_bytes'] / 2**20:,.0f}"
              f" MiB over {got['before'] / 2**20:,.0f} MiB (plan's model {model / 2**20:,.0f} MiB, {row['error']:+.0%}); "
              f"{got['wall_s']:.0f} s wall, {got['cpu_s']:.0f} CPU s", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"measured_at": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
