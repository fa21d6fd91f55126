"""Removal benchmark: q/s and recall of a ScaNN tree memory with 0.1%, 1% and 10% of its items removed.

Run: ``.venv/bin/python benchmarks/removal.py`` (``--help`` for sizes; about 10 minutes on 2 cores).
Default: 200,000 x 64 clustered unit vectors (100 clusters, seeded) in one ScaNN shard (a tree),
2,000 queries, k=10. Every removed version is measured side by side, in this process, with the
clean version 1 of the same items, the two taking turns in every timed repeat (and, with
``--rebuilt``, a tree built from the live items only).

Two ways to remove (``--modes``): ``random`` items, or whole ``class``es (shuffled classes, the last
one cut), nested so that 1% contains the 0.1%. Two query sets: ``all`` (new points drawn like the
items) and ``near`` (removed items plus noise: their true neighbours are gone, the hard case for a
tree whose leaves were emptied). Recall@k is against brute force over the version's live items.
``--real DIR`` adds a run on real embeddings: ``DIR/*.npy`` row chunks (sorted by name) plus
``DIR/labels.npy`` or ``DIR/test-labels.npy``; the last ``--real-queries`` rows are the queries.

Writes ``bench-out/removal.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from build import class_names, item_ids  # noqa: E402
from memory import Memory, write_memory  # noqa: E402
from memory.mutations import remove_items  # noqa: E402
from search import make_data, print_table, timed, write_json  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="memory items (synthetic)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--fractions", default="0.001,0.01,0.1", help="fractions removed, comma separated")
    ap.add_argument("--modes", default="random,class", help="random and/or class")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best counts)")
    ap.add_argument("--rebuilt", action="store_true", help="also build and time a tree of the live items")
    ap.add_argument("--real", default=None, help="folder of real embedding chunks (see above)")
    ap.add_argument("--real-queries", type=int, default=1_000)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--out", default="bench-out/removal.json")
    return ap.parse_args(argv)


def load_real(folder, queries):
    """Unit rows and labels from ``folder``; the last ``queries`` rows are held out as queries."""
    files = sorted(f for f in glob.glob(os.path.join(folder, "*.npy")) if "labels" not in os.path.basename(f))
    x = np.concatenate([np.load(f) for f in files]).astype(np.float32)
    lab_file = next(f for f in (os.path.join(folder, "labels.npy"), os.path.join(folder, "test-labels.npy"))
                    if os.path.exists(f))
    labels = np.load(lab_file)[:len(x)].astype(np.int64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:-queries], labels[:-queries], x[-queries:]


def removal_order(labels, mode, rng):
    """Rows in the order they are removed: the first ``f * n`` are the removed set for fraction ``f``."""
    if mode == "random":
        return rng.permutation(len(labels))
    if mode == "class":
        classes = rng.permutation(int(labels.max()) + 1)
        return np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in classes])
    raise ValueError(f"unknown removal mode {mode!r}; choose random or class")


def truth(x, live, q, k):
    """Exact top-k rows among ``live`` for each query (ScaNN brute force)."""
    import scann

    brute = scann.scann_ops_pybind.builder(x[live], k, "dot_product").score_brute_force().build()
    return live[np.asarray(brute.search_batched_parallel(q, k)[0], dtype=np.int64)]


def measure(path, versions, q, k, ids, want_rows, repeat):
    """Open each of ``versions`` (timed: opening includes deleting removed items) and time searches
    of ``q``, the versions taking turns in every repeat (a busy moment of a shared machine hits all
    alike); recall@k of each against its ``want_rows``."""
    opened, out = [], []
    try:
        for v in versions:
            t = time.perf_counter()
            opened.append(Memory.open(path, v))
            out.append({"open_s": time.perf_counter() - t, "secs": float("inf")})
        for mem in opened:
            mem.search(q[:256], k)  # warm-up
        for _ in range(repeat):
            for mem, o in zip(opened, out):
                secs, nb = timed(lambda: mem.search(q, k))
                o["secs"], o["nb"] = min(o["secs"], secs), nb
    finally:
        for mem in opened:
            mem.close()
    for o, want in zip(out, want_rows):
        nb = o.pop("nb")
        o.update(qps=len(q) / o.pop("secs"), padded=int((nb.labels == -1).sum()),
                 recall=float(np.mean([len(set(g) & set(w)) / k for g, w in zip(nb.ids, ids[want])])))
    return out


def run_dataset(name, x, labels, q_all, args, work, rng):
    """Build once, then for each mode a copy that loses ever more items; one row per measurement."""
    ids, k, rows = item_ids(len(x)), args.k, []
    base = os.path.join(work, f"{name}-base")
    t = time.perf_counter()
    write_memory(base, x, labels, ids, backend="scann", class_names=class_names(labels),
                 backend_params={"brute_force": False})
    print(f"{name}: built {len(x)} x {x.shape[1]} in {time.perf_counter() - t:.0f} s", flush=True)
    fractions = [float(f) for f in args.fractions.split(",")]
    for mode in args.modes.split(","):
        path = os.path.join(work, f"{name}-{mode}")
        shutil.copytree(base, path)
        order = removal_order(labels, mode, rng)
        done = 0
        for f in fractions:
            cut = int(round(f * len(x)))
            remove_items(path, ids=list(ids[order[done:cut]]), reason=f"benchmark {f}")
            done = cut
            live = np.sort(order[cut:])
            gone = order[:cut]
            near = x[gone[rng.integers(0, len(gone), len(q_all))]] + 0.1 * rng.standard_normal(q_all.shape)
            q_near = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32)
            for qname, q in (("all", q_all), ("near", q_near)):
                clean, removed = measure(path, [1, None], q, k, ids,
                                         [truth(x, np.arange(len(x)), q, k), truth(x, live, q, k)], args.repeat)
                row = {"data": name, "mode": mode, "removed": f, "queries": qname, "clean": clean, "removed_m": removed}
                if args.rebuilt:
                    row["rebuilt"] = measure_rebuilt(work, x, labels, ids, live, q, k, truth(x, live, q, k), args)
                rows.append(row)
                print(f"{name} {mode} {100 * f:g}% {qname}: clean {clean['qps']:,.0f} q/s r={clean['recall']:.3f}; "
                      f"removed {removed['qps']:,.0f} q/s r={removed['recall']:.3f} pad={removed['padded']} "
                      f"open {removed['open_s']:.2f} s", flush=True)
    return rows


def measure_rebuilt(work, x, labels, ids, live, q, k, want_rows, args):
    path = os.path.join(work, "rebuilt")
    shutil.rmtree(path, ignore_errors=True)
    write_memory(path, x[live], labels[live], ids[live], backend="scann", class_names=class_names(labels),
                 backend_params={"brute_force": False})
    return measure(path, [None], q, k, ids, [want_rows], args.repeat)[0]


def print_report(rows, k):
    head = ["data", "removed", "mode", "queries", "clean v1 q/s", "removed q/s", "ratio",
            f"recall@{k} clean", f"recall@{k} removed", "padded", "open s (clean / removed)"]
    if any("rebuilt" in r for r in rows):
        head += ["rebuilt q/s", f"recall@{k} rebuilt"]
    table = []
    for r in rows:
        c, m = r["clean"], r["removed_m"]
        line = [r["data"], f"{100 * r['removed']:g}%", r["mode"], r["queries"], f"{c['qps']:,.0f}", f"{m['qps']:,.0f}",
                f"{m['qps'] / c['qps']:.2f}x", f"{c['recall']:.3f}", f"{m['recall']:.3f}", m["padded"],
                f"{c['open_s']:.2f} / {m['open_s']:.2f}"]
        if "rebuilt" in r:
            line += [f"{r['rebuilt']['qps']:,.0f}", f"{r['rebuilt']['recall']:.3f}"]
        table.append(line)
    print()
    print_table(head, table)


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp(prefix="vismem-bench-removal-")
    rows = []
    try:
        if not args.skip_synthetic:
            x, labels, q = make_data(args.n, args.dim, args.clusters, args.queries, seed=0)
            rows += run_dataset("synthetic", x, labels, q, args, work, rng)
        if args.real:
            x, labels, q = load_real(args.real, args.real_queries)
            rows += run_dataset("real", x, labels, q, args, work, rng)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, {"args": vars(args), "rows": rows})
    print_report(rows, args.k)


if __name__ == "__main__":
    main()
