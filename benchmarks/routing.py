"""Routing benchmark: a k-means memory searched with ``probe_shards=P`` against one unsharded ScaNN searcher.

Each searcher is measured at its best settings for a recall target.

Run: ``.venv/bin/python benchmarks/routing.py`` (``--help`` for sizes). Default: the search
benchmark's 1M x 128 clustered unit vectors (seeded), 10k queries, k=10, 8 shards built by the Beam
job (DirectRunner, 2 worker processes) with 8 cells (one centroid per shard) and with 128 cells
(16 per shard). For every searcher, a sweep of (leaves searched, candidates reordered) gives its
recall@10 / queries/s curve; the figure of merit is the best queries/s at recall@10 >= the target.
The unsharded searcher is measured twice: raw ScaNN (``search_batched`` on the same searcher) and
the same searcher as a one-shard memory. Everything runs in this process, side by side, and the
searchers take turns at every setting (so a busy moment of a shared machine hits all of them).

Real data: ``--fmnist-cache DIR --queries 2000`` routes the 68,000 Fashion-MNIST EfficientNet-Lite0
embeddings (1,280-d) with 2,000 held-out test images as queries (shards under 5,000 items are ScaNN
brute force, so leaves and reorder then change only the unsharded tree).

Also printed: the routing ceiling, the share of true top-10 neighbours that lie in the P shards a
query visits, whatever the search inside a shard does. ``--margins 0.03,0.05,0.08`` adds routed
searchers with a probe margin (a query visits its 2nd..P-th nearest shards only where they are
within the margin of its nearest; P is the largest of ``--probes``), with the shards each visits.

Targets: at recall@10 >= 0.99 the routed memory keeps at least 0.9x the queries/s of the
unsharded searcher (issue 4); the one-shard memory >= 0.95x raw ScaNN, routed P = 1 >= 1.3x raw, and
(``--hashed``) a hash-partitioned memory of the same shards >= 0.5x one shard (issue 12).
Writes ``bench-out/routing.json`` and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from build import add_beam_args, class_names, direct_runner_args, item_ids, write_inputs  # noqa: E402
from memory import Memory, write_memory  # noqa: E402
from memory.partition import Router, kmeans_partition  # noqa: E402
from pipelines.build import build_memory  # noqa: E402
from search import add_data_args, int_list, make_data, print_table, recall, timed, write_json  # noqa: E402


def best_at(rows, target):
    ok = [r for r in rows if r["recall@10"] >= target]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--cells", type=int_list, default="8,128", help="k-means cells per built memory, comma separated")
    ap.add_argument("--probes", type=int_list, default="1,2,3,4", help="probe_shards values to sweep")
    ap.add_argument("--margins", type=float_list, default="",
                    help="probe margins to sweep, comma separated (each with P = the largest --probes: a query "
                         "visits its further shards only within the margin of its nearest)")
    ap.add_argument("--leaves", type=int_list, default="1,2,3,4,6,8,12,16,24",
                    help="leaves searched (per shard for routed memories) to sweep")
    ap.add_argument("--reorders", type=int_list, default="30,50,100,200",
                    help="candidates reordered exactly, to sweep")
    ap.add_argument("--hashed", action="store_true",
                    help="also sweep a hash-partitioned memory of --shards shards (every shard searched)")
    ap.add_argument("--hashed-leaves", type=int, default=None,
                    help="leaves of each hashed shard's tree (default: about sqrt of its items)")
    ap.add_argument("--target", type=float, default=0.99, help="recall@10 target")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per setting (best counts)")
    add_beam_args(ap)
    ap.add_argument("--work-dir", default=None, help="keep (and reuse) the memories here")
    ap.add_argument("--fmnist-cache", default=None,
                    help="use the real Fashion-MNIST EfficientNet-Lite0 embeddings cached here (benchmarks/storage.py "
                         "--embed writes them) instead of synthetic data: the first --queries test images are the "
                         "queries, every other image the memory (use --queries 2000)")
    ap.add_argument("--out", default="bench-out/routing.json")
    return ap.parse_args(argv)


def float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def true_neighbours(x, q):
    """Rows of each query's exact top 10 (ScaNN brute force)."""
    import scann

    brute = scann.scann_ops_pybind.builder(x, 10, "dot_product").score_brute_force().build()
    return np.asarray(brute.search_batched_parallel(q, 10)[0])


def hashed_path(work, args):
    return os.path.join(work, f"hashed-{args.shards}" + (f"-leaves{args.hashed_leaves}" if args.hashed_leaves else ""))


def build_memories(args, work, x, labels, ids):
    """The unsharded memory and one k-means memory per cell count, each unless already in ``work``;
    returns the build seconds of those built."""
    classes = class_names(labels)
    inputs = os.path.join(work, "emb")
    if not os.path.isdir(inputs):
        os.makedirs(inputs)
        write_inputs(inputs, x, labels, args.files)
    build_s = {}
    one = os.path.join(work, "one")
    if not os.path.isdir(one):
        t = time.perf_counter()
        write_memory(one, x, labels, ids, num_shards=1, backend="scann", class_names=classes)
        build_s["unsharded"] = time.perf_counter() - t
    hashed = hashed_path(work, args)
    if args.hashed and not os.path.isdir(hashed):
        t = time.perf_counter()  # the sweep sets leaves and reorder: no tuning needed
        write_memory(hashed, x, labels, ids, num_shards=args.shards, backend="scann", class_names=classes,
                     target_recall=None, backend_params={"num_leaves": args.hashed_leaves})
        build_s["hashed"] = time.perf_counter() - t
    for c in args.cells:
        path = os.path.join(work, f"kmeans-{c}")
        if not os.path.isdir(path):
            t = time.perf_counter()
            build_memory(inputs, path, num_shards=args.shards, class_names=classes, partition="kmeans",
                         kmeans_cells=c, backend="scann", pipeline_args=direct_runner_args(args.workers))
            build_s[f"cells {c}"] = time.perf_counter() - t
            print(f"built {path} in {build_s[f'cells {c}']:.0f} s", flush=True)
    return build_s


class Sweeps:
    """Every searcher's recall@10 / queries/s curve over the same settings grid and queries.

    Searchers are timed interleaved: for each setting, each repeat runs every searcher once in
    turn, so a busy moment of a shared machine hits them alike and the ratios hold.
    """

    def __init__(self, q, truth, grid, repeat, target):
        self.q, self.truth, self.grid, self.repeat, self.target = q, truth, grid, repeat, target
        self.curves = {}

    def run(self, searchers: dict):
        """``searchers``: name -> ``search(queries, setting) -> ids``."""
        for setting in self.grid:
            best = {}
            for name, search in searchers.items():
                search(self.q[:512], setting)  # warm-up
            for _ in range(self.repeat):
                for name, search in searchers.items():
                    secs, got = timed(lambda: search(self.q, setting))
                    if secs < best.get(name, (float("inf"),))[0]:
                        best[name] = (secs, got)
            for name, (secs, got) in best.items():
                self.curves.setdefault(name, []).append(
                    {"setting": setting, "recall@10": recall(got, self.truth, 10), "qps": len(self.q) / secs})
        for name, rows in self.curves.items():
            b = best_at(rows, self.target)
            found = "none" if b is None else f"{b['qps']:,.0f} q/s ({b['recall@10']:.4f}, {b['setting']})"
            print(f"{name}: best at recall >= {self.target}: {found}", flush=True)


def unsharded_searchers(mem, ids):
    """The one-shard memory's ScaNN searcher called raw, and the same searcher through the memory."""
    raw = mem.shards[0].index.searcher.searcher  # the pybind searcher behind the one-shard memory
    n_leaves = mem.shards[0].entry.params["num_leaves"]

    def raw_search(qq, s):
        pos, _ = raw.search_batched(qq, 10, s["reorder"], s["leaves"], True, 256)
        return ids[np.asarray(pos)]

    return {f"raw ScaNN, unsharded ({n_leaves} leaves)": raw_search,
            "memory, 1 shard": lambda qq, s: mem.search(qq, 10, leaves_to_search=s["leaves"],
                                                         reorder=s["reorder"]).ids}


def routing_ceiling(x, q, truth_rows, centroids, cell_partitions, probes, label, margins=()):
    """For each P in ``probes`` (and each margin at the largest P): the share of true top-10 neighbours in
    the shards a query visits, and how many shards it visits on average."""
    item_part = kmeans_partition(x, centroids, cell_partitions)[truth_rows]  # (Q, 10) partition of each
    router = Router(centroids, cell_partitions)
    ceiling = {}
    for p, m in [(p, None) for p in probes] + [(max(probes), m) for m in margins]:
        route = router(q, p, m)
        inside = (item_part[:, :, None] == route[:, None, :]).any(axis=2)
        key = f"{label}, P={p}" + (f", margin {m:g}" if m is not None else "")
        ceiling[key] = float(inside.mean())
        ceiling[key + " (shards visited)"] = float((route >= 0).sum(1).mean())
    print(f"{label}: routing ceiling " + ", ".join(f"{k.split(', ', 1)[1]} {v:.4f}" for k, v in ceiling.items()),
          flush=True)
    return ceiling


def routed_searchers(args, mem, cells, x, q, truth_rows, ceiling):
    """A k-means memory: its routing ceiling, and one searcher per ``probe_shards`` value."""
    part = mem.manifest.partitioning
    cent, cellp = np.asarray(part.centroids, np.float32), part.cell_partitions
    ceiling.update(routing_ceiling(x, q, truth_rows, cent, cellp, args.probes, f"cells {cells}", args.margins))
    out = {f"k-means {args.shards} shards / {cells} cells, P={p}":
           (lambda qq, s, p=p: mem.search(qq, 10, leaves_to_search=s["leaves"], reorder=s["reorder"],
                                          probe_shards=p).ids)
           for p in args.probes}
    top = max(args.probes)
    out.update({f"k-means {args.shards} shards / {cells} cells, P<={top}, margin {m:g}":
                (lambda qq, s, m=m: mem.search(qq, 10, leaves_to_search=s["leaves"], reorder=s["reorder"],
                                               probe_shards=top, probe_margin=m).ids)
                for m in args.margins})
    return out


def print_report(res, target):
    """The best of each curve against the two unsharded baselines, then the routing ceilings."""
    names = list(res["curves"])
    raw_best, mem_best = res["best"][names[0]], res["best"][names[1]]
    table = []
    for n in names:
        b = res["best"][n]
        if b is None:
            table.append([n, f"not reached (max recall {max(r['recall@10'] for r in res['curves'][n]):.4f})"])
            continue
        vs = [f"{b['qps'] / r['qps']:.2f}x" if r else "-" for r in (raw_best, mem_best)]
        table.append([n, f"{b['qps']:,.0f}", f"{b['recall@10']:.4f}",
                      f"leaves {b['setting']['leaves']}, reorder {b['setting']['reorder']}", *vs])
    print()
    print_table(["searcher", f"best q/s at recall@10 >= {target}", "recall@10", "setting", "vs raw",
                 "vs 1-shard memory"], table)
    print()
    print_table(["routing", "ceiling (share of true top-10 in the visited shards)"],
                [[key, f"{v:.4f}"] for key, v in res["ceiling"].items()])


def main(argv=None):
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="vismem-bench-routing-")
    os.makedirs(work, exist_ok=True)
    if args.fmnist_cache:  # real embeddings: their clusters are not far apart, unlike the synthetic ones
        from storage import load_fmnist

        x, labels, q, _, _ = load_fmnist(args.fmnist_cache, args.queries)
        args.n, args.dim, args.clusters = len(x), x.shape[1], "fashion-mnist"
    else:
        x, labels, q = make_data(args.n, args.dim, args.clusters, args.queries, seed=0)
    ids = item_ids(len(x))
    truth_rows = true_neighbours(x, q)
    grid = [{"leaves": lv, "reorder": ro} for lv in args.leaves for ro in args.reorders]
    sweeps = Sweeps(q, ids[truth_rows], grid, args.repeat, args.target)
    res = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "queries": args.queries, "shards": args.shards,
           "target": args.target, "curves": sweeps.curves, "ceiling": {},
           "build_s": build_memories(args, work, x, labels, ids)}
    with contextlib.ExitStack() as stack:
        one = stack.enter_context(Memory.open(os.path.join(work, "one")))
        searchers = unsharded_searchers(one, ids)
        if args.hashed:
            hashed = stack.enter_context(Memory.open(hashed_path(work, args)))
            searchers[f"hashed {args.shards} shards, all searched"] = \
                lambda qq, s: hashed.search(qq, 10, leaves_to_search=s["leaves"], reorder=s["reorder"]).ids
        for c in args.cells:
            mem = stack.enter_context(Memory.open(os.path.join(work, f"kmeans-{c}")))
            searchers.update(routed_searchers(args, mem, c, x, q, truth_rows, res["ceiling"]))
        sweeps.run(searchers)
    res["best"] = {n: best_at(curve, args.target) for n, curve in res["curves"].items()}
    write_json(args.out, res)
    print_report(res, args.target)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
