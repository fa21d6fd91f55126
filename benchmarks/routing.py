"""Routing benchmark: a k-means partitioned memory searched with ``probe_shards=P`` against one
unsharded ScaNN searcher, each at its best settings for a recall target.

Run: ``.venv/bin/python benchmarks/routing.py`` (``--help`` for sizes). Default: the search
benchmark's 1M x 128 clustered unit vectors (seeded), 10k queries, k=10, 8 shards built by the Beam
job (DirectRunner, 2 worker processes) with 8 cells (one centroid per shard) and with 128 cells
(16 per shard). For every searcher, a sweep of (leaves searched, candidates reordered) gives its
recall@10 / queries/s curve; the figure of merit is the best queries/s at recall@10 >= the target.
The unsharded searcher is measured twice: raw ScaNN (``search_batched`` on the same searcher) and
the same searcher as a one-shard memory. Everything runs in this process, side by side.

Also printed: the routing ceiling, the share of true top-10 neighbours that lie in the P shards a
query visits, whatever the search inside a shard does.

Target (issue 4): at recall@10 >= 0.99 the routed memory keeps at least 0.9x the queries/s of the
unsharded searcher. Writes ``bench-out/routing.json`` and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from build import write_inputs  # noqa: E402  (benchmarks/build.py: the same input files)
from memory import Memory, write_memory  # noqa: E402
from memory.partition import kmeans_partition, nearest_partitions  # noqa: E402
from pipelines.build import build_memory  # noqa: E402
from search import add_data_args, make_data, recall, timed  # noqa: E402  (benchmarks/search.py: the same data)


def best_at(rows, target):
    ok = [r for r in rows if r["recall@10"] >= target]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--cells", default="8,128", help="k-means cells per built memory, comma separated")
    ap.add_argument("--probes", default="1,2,3,4", help="probe_shards values to sweep")
    ap.add_argument("--leaves", default="1,2,3,4,6,8,12,16,24",
                    help="leaves searched (per shard for routed memories) to sweep")
    ap.add_argument("--reorders", default="30,50,100,200", help="candidates reordered exactly, to sweep")
    ap.add_argument("--target", type=float, default=0.99, help="recall@10 target")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per setting (best counts)")
    ap.add_argument("--files", type=int, default=16, help="embedding shards (input files)")
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    ap.add_argument("--work-dir", default=None, help="keep (and reuse) the memories here")
    ap.add_argument("--out", default="bench-out/routing.json")
    args = ap.parse_args(argv)
    cells_list = [int(c) for c in args.cells.split(",")]
    probes = [int(p) for p in args.probes.split(",")]
    leaves = [int(v) for v in args.leaves.split(",")]
    reorders = [int(v) for v in args.reorders.split(",")]
    pipe = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"]
    work = args.work_dir or tempfile.mkdtemp(prefix="vismem-bench-routing-")
    os.makedirs(work, exist_ok=True)

    import scann

    x, labels, q = make_data(args.n, args.dim, args.clusters, args.queries, seed=0)
    classes = [f"c{i}" for i in range(int(labels.max()) + 1)]
    inputs = os.path.join(work, "emb")
    if not os.path.isdir(inputs):
        os.makedirs(inputs)
        write_inputs(inputs, x, labels, args.files)
    ids = np.array([f"x{i:08d}" for i in range(len(x))], dtype=object)
    brute = scann.scann_ops_pybind.builder(x, 10, "dot_product").score_brute_force().build()
    truth_rows = np.asarray(brute.search_batched_parallel(q, 10)[0])
    truth = ids[truth_rows]
    del brute
    res = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "queries": args.queries, "shards": args.shards,
           "target": args.target, "curves": {}, "ceiling": {}, "build_s": {}}

    one = os.path.join(work, "one")
    if not os.path.isdir(one):
        t = time.perf_counter()
        write_memory(one, x, labels, ids, num_shards=1, backend="scann", class_names=classes)
        res["build_s"]["unsharded"] = time.perf_counter() - t
    for c in cells_list:
        path = os.path.join(work, f"kmeans-{c}")
        if not os.path.isdir(path):
            t = time.perf_counter()
            build_memory(inputs, path, num_shards=args.shards, class_names=classes, partition="kmeans",
                         kmeans_cells=c, backend="scann", pipeline_args=pipe)
            res["build_s"][f"cells {c}"] = time.perf_counter() - t
            print(f"built {path} in {res['build_s'][f'cells {c}']:.0f} s", flush=True)

    def sweep(name, search, grid):
        rows = []
        for setting in grid:
            search(q[:512], setting)  # warm-up
            secs, got = timed(lambda: search(q, setting), args.repeat)
            rows.append({"setting": setting, "recall@10": recall(got, truth, 10), "qps": len(q) / secs})
        res["curves"][name] = rows
        best = best_at(rows, args.target)
        found = "none" if best is None else f"{best['qps']:,.0f} q/s ({best['recall@10']:.4f}, {best['setting']})"
        print(f"{name}: best at recall >= {args.target}: {found}", flush=True)
        return rows

    grid = [{"leaves": lv, "reorder": ro} for lv in leaves for ro in reorders]
    with Memory.open(one) as mem:
        raw = mem.shards[0].index.searcher.searcher  # the pybind searcher behind the one-shard memory
        n_leaves = mem.shards[0].entry["params"]["num_leaves"]

        def raw_search(qq, s):
            pos, _ = raw.search_batched(qq, 10, s["reorder"], s["leaves"], True, 256)
            return ids[np.asarray(pos)]

        sweep(f"raw ScaNN, unsharded ({n_leaves} leaves)", raw_search, grid)
        sweep("memory, 1 shard", lambda qq, s: mem.search(qq, 10, leaves_to_search=s["leaves"],
                                                           reorder=s["reorder"]).ids, grid)
    for c in cells_list:
        with Memory.open(os.path.join(work, f"kmeans-{c}")) as mem:
            part = mem.manifest["partitioning"]
            cent, cellp = np.asarray(part["centroids"], np.float32), part.get("cell_partitions")
            item_part = kmeans_partition(x, cent, cellp)[truth_rows]  # (Q, 10) partition of each true neighbour
            for p in probes:
                route = nearest_partitions(q, cent, p, cellp)
                inside = (item_part[:, :, None] == route[:, None, :]).any(axis=2)
                res["ceiling"][f"cells {c}, P={p}"] = float(inside.mean())
            print(f"cells {c}: routing ceiling " + ", ".join(
                f"P={p} {res['ceiling'][f'cells {c}, P={p}']:.4f}" for p in probes), flush=True)
            for p in probes:
                sweep(f"k-means {args.shards} shards / {c} cells, P={p}",
                      lambda qq, s, p=p: mem.search(qq, 10, leaves_to_search=s["leaves"], reorder=s["reorder"],
                                                   probe_shards=p).ids, grid)

    names = list(res["curves"])
    base = {n: best_at(res["curves"][n], args.target) for n in names}
    res["best"] = {n: b for n, b in base.items()}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    json.dump(res, open(args.out, "w"), indent=1)
    raw_best, mem_best = base[names[0]], base[names[1]]
    print(f"\n| searcher | best q/s at recall@10 >= {args.target} | recall@10 | setting | vs raw | vs 1-shard memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in names:
        b = base[n]
        if b is None:
            print(f"| {n} | not reached (max recall {max(r['recall@10'] for r in res['curves'][n]):.4f}) | | | | |")
            continue
        vs = [f"{b['qps'] / r['qps']:.2f}x" if r else "-" for r in (raw_best, mem_best)]
        print(f"| {n} | {b['qps']:,.0f} | {b['recall@10']:.4f} | leaves {b['setting']['leaves']}, "
              f"reorder {b['setting']['reorder']} | {vs[0]} | {vs[1]} |")
    print("\n| routing | ceiling (share of true top-10 in the visited shards) |\n| --- | --- |")
    for key, v in res["ceiling"].items():
        print(f"| {key} | {v:.4f} |")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
