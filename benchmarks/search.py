"""Search benchmark: the memory (exact and ScaNN, 1 and 8 shards) against faiss, hnswlib and raw ScaNN.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/search.py --help``). Every method runs in this
one process, side by side, on the same data, so ratios are meaningful on a noisy machine. Default:
1M x 128 unit vectors in 1,000 Gaussian clusters (seeded), 10k queries, k = 10 and 100, 2 threads.
Expect about 20-30 minutes on 2 cores (index builds dominate: hnswlib alone takes several minutes).
Writes ``bench-out/search.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memory import Memory, write_memory  # noqa: E402
from memory.scann_index import scann_params  # noqa: E402
from memory.fanout import SerialFanout  # noqa: E402

CLASS_NAMES = [str(i) for i in range(1000)]  # make_data's labels
# (leaves searched, candidates reordered exactly): recall is capped by the reorder depth.
SCANN_SWEEP = [(2, 100), (4, 100), (8, 100), (2, 200), (4, 200), (8, 200), (4, 400), (8, 400), (16, 400)]
# (nprobe, candidates refined exactly), the same trade-off as ScaNN's (leaves, reorder).
IVF_SWEEP = [(2, 100), (4, 100), (4, 200), (8, 200), (4, 400), (8, 400), (16, 400), (16, 800)]
HNSW_EFS = [64, 128, 256, 512]


def labelled_data(n, dim, clusters, queries, seed):
    """Unit vectors in ``clusters`` Gaussian clusters (seeded): items, their clusters, queries, theirs."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)

    def draw(m):
        c = rng.integers(0, clusters, m)
        x = centres[c] + 0.5 * rng.standard_normal((m, dim)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), c

    x, labels = draw(n)
    q, q_labels = draw(queries)
    return x, labels, q, q_labels


def make_data(n, dim, clusters, queries, seed):
    x, labels, q, _ = labelled_data(n, dim, clusters, queries, seed)
    return x, labels % 1000, q


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def recall(got, truth, k):
    return float(np.mean([len(set(g[:k]) & set(t[:k])) / k for g, t in zip(got, truth)]))


def sgemm_bound(dim, n, queries, threads):
    import torch
    torch.set_num_threads(threads)
    a = torch.randn(1024, dim)
    b = torch.randn(dim, 8192)
    out = torch.empty(1024, 8192)
    torch.mm(a, b, out=out)
    secs, _ = timed(lambda: [torch.mm(a, b, out=out) for _ in range(20)], repeat=5)
    flops = 20 * 2 * 1024 * dim * 8192 / secs
    return flops, flops / (2 * n * dim)


def add_data_args(ap):
    """The benchmark data's size options, shared by every benchmark that uses :func:`make_data`."""
    ap.add_argument("--n", type=int, default=1_000_000, help="memory items")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=10_000)


def int_list(text):
    """A comma-separated option's integers (an argparse ``type``)."""
    return [int(v) for v in text.split(",")]


def write_json(path, obj):
    """Write a benchmark's results to ``path`` (its folder created if need be)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def print_table(header, rows):
    """Print a Markdown table; a row shorter than the header leaves its last cells empty."""
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |" + " |" * (len(header) - len(row)))


class Rows(list):
    """The result rows; each is printed as it is recorded, so a long run shows its progress."""

    def __init__(self, queries):
        super().__init__()
        self.queries = queries

    def add(self, method, k, rec, secs, note=""):
        qps = self.queries / secs
        self.append({"method": method, "k": k, "recall@10": round(rec, 4), "qps": round(qps, 1), "note": note})
        print(f"{method:45s} k={k:<4d} recall@10={rec:.4f} qps={qps:10.1f} {note}", flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of methods to skip: hnswlib,faiss-ivf,exact,scann")
    ap.add_argument("--out", default="bench-out/search.json")
    return ap.parse_args(argv)


def bench_sgemm_bound(args, rows):
    """The exact search's ceiling: this machine's sgemm rate over the flops of one query."""
    flops, bound_qps = sgemm_bound(args.dim, args.n, args.queries, args.threads)
    rows.append({"method": "sgemm bound (exact)", "k": 0, "recall@10": 1.0, "qps": round(bound_qps, 1),
                 "note": f"{flops / 1e9:.0f} GFLOP/s"})
    print(f"sgemm {flops / 1e9:.0f} GFLOP/s -> bound {bound_qps:.0f} q/s", flush=True)


def bench_faiss_flat(x, q, rows):
    """faiss's exact search at k = 10 and 100; returns the true top 10 of every query."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    truth = {}
    for k in (10, 100):
        secs, (_, truth[k]) = timed(lambda: index.search(q, k))
        rows.add("faiss IndexFlatIP", k, 1.0, secs)
    return truth[10]


def bench_memory_exact(tmp, x, labels, ids, q, truth10, rows):
    """The memory's exact search, 1 and 8 shards (8 fanned out by threads, then serially)."""
    for shards in (1, 8):
        path = os.path.join(tmp, f"exact-{shards}")
        write_memory(path, x, labels, ids, num_shards=shards, class_names=CLASS_NAMES)
        executors = {"threads": None} if shards == 1 else {"threads": None, "serial": SerialFanout()}
        for ex_name, executor in executors.items():
            with Memory.open(path, verify=False, executor=executor) as mem:
                for k in (10, 100):
                    secs, nb = timed(lambda: mem.search(q, k))
                    got = nb.ids.astype(np.int64)
                    rows.add(f"memory exact, {shards} shard(s)", k, recall(got, truth10, 10), secs,
                             f"fan-out: {ex_name}" if shards > 1 else "")


def bench_raw_scann(x, q, truth10, rows):
    """One ScaNN searcher built by hand, over :data:`SCANN_SWEEP`; returns its number of leaves."""
    import scann

    p = scann_params(*x.shape)
    leaves = p["num_leaves"]
    t = time.perf_counter()
    raw = (scann.scann_ops_pybind.builder(x, 10, "dot_product")
           .tree(num_leaves=leaves, num_leaves_to_search=p["num_leaves_to_search"],
                 training_sample_size=p["training_sample_size"])
           .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).build())
    print(f"raw ScaNN build {time.perf_counter() - t:.1f}s ({leaves} leaves)", flush=True)
    for ls, ro in SCANN_SWEEP:
        secs, (got, _) = timed(lambda: raw.search_batched_parallel(q, 10, leaves_to_search=ls,
                                                                   pre_reorder_num_neighbors=ro), repeat=3)
        rows.add("raw ScaNN searcher", 10, recall(got, truth10, 10), secs, f"leaves {ls}/{leaves}, reorder {ro}")
    return leaves


def bench_memory_scann(tmp, x, labels, ids, q, truth10, leaves, rows):
    """The memory's ScaNN backend, 1 and 8 shards, over the raw searcher's sweep (``leaves``: its leaves)."""
    for shards in (1, 8):
        path = os.path.join(tmp, f"scann-{shards}")
        t = time.perf_counter()
        write_memory(path, x, labels, ids, num_shards=shards, backend="scann", class_names=CLASS_NAMES)
        print(f"scann memory build, {shards} shards: {time.perf_counter() - t:.1f}s", flush=True)
        with Memory.open(path, verify=False) as mem:
            shard_leaves = mem.manifest.shards[0].params["num_leaves"]
            for ls, ro in SCANN_SWEEP:
                # Same share of each shard's leaves as the unsharded index searches.
                lss = max(1, round(ls * shard_leaves / leaves))
                ros = max(10, ro // shards) if shards > 1 else ro
                secs, nb = timed(lambda: mem.search(q, 10, leaves_to_search=lss, reorder=ros), repeat=3)
                rows.add(f"memory scann, {shards} shard(s)", 10, recall(nb.ids.astype(np.int64), truth10, 10),
                         secs, f"leaves {lss}/{shard_leaves}, reorder {ros} per shard")


def bench_faiss_ivf(x, q, truth10, rows):
    """faiss IVF with 4-bit fast-scan PQ and exact refinement, over :data:`IVF_SWEEP`."""
    import faiss

    t = time.perf_counter()
    base = faiss.index_factory(x.shape[1], "IVF1000,PQ64x4fs", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.IndexRefineFlat(base)
    ivf.train(x[:200_000] if len(x) > 200_000 else x)
    ivf.add(x)
    print(f"faiss IVF build {time.perf_counter() - t:.1f}s", flush=True)
    for nprobe, refine in IVF_SWEEP:
        faiss.extract_index_ivf(base).nprobe = nprobe
        ivf.k_factor = refine / 10
        secs, (_, got) = timed(lambda: ivf.search(q, 10), repeat=3)
        rows.add("faiss IVF1000 PQ64x4fs + refine", 10, recall(got, truth10, 10), secs,
                 f"nprobe {nprobe}, refine {refine}")


def bench_hnswlib(x, q, truth10, threads, rows):
    """hnswlib's graph index (M = 16), over :data:`HNSW_EFS`."""
    import hnswlib

    t = time.perf_counter()
    h = hnswlib.Index(space="ip", dim=x.shape[1])
    h.init_index(max_elements=len(x), M=16, ef_construction=100)
    h.set_num_threads(threads)
    h.add_items(x, np.arange(len(x)))
    print(f"hnswlib build {time.perf_counter() - t:.1f}s", flush=True)
    for ef in HNSW_EFS:
        h.set_ef(ef)
        secs, (got, _) = timed(lambda: h.knn_query(q, k=10), repeat=3)
        rows.add("hnswlib M=16", 10, recall(got, truth10, 10), secs, f"ef {ef}")


def main(argv=None):
    args = parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    x, labels, q = make_data(args.n, args.dim, args.clusters, args.queries, seed=0)
    ids = np.array([f"{i:08d}" for i in range(args.n)], dtype=object)  # id order = row order
    rows = Rows(args.queries)
    bench_sgemm_bound(args, rows)
    truth10 = bench_faiss_flat(x, q, rows)
    tmp = tempfile.mkdtemp(prefix="vismem-bench-")
    if "exact" not in skip:
        bench_memory_exact(tmp, x, labels, ids, q, truth10, rows)
    if "scann" not in skip:
        leaves = bench_raw_scann(x, q, truth10, rows)
        bench_memory_scann(tmp, x, labels, ids, q, truth10, leaves, rows)
    if "faiss-ivf" not in skip:
        bench_faiss_ivf(x, q, truth10, rows)
    if "hnswlib" not in skip:
        bench_hnswlib(x, q, truth10, args.threads, rows)
    write_json(args.out, {"args": vars(args), "rows": rows})
    print()
    print_table(["method", "k", "recall@10", "queries/s", "setting"],
                [[r["method"], r["k"] or "", r["recall@10"], r["qps"], r["note"]] for r in rows])


if __name__ == "__main__":
    main()
