"""Cost of scoring every voting rule at every k against the retrieval pass it comes from.

Run: ``.venv/bin/python benchmarks/eval_cost.py`` (about 6 minutes; ``--help`` for sizes). Target
(evaluation issue): scoring all four rules at every k = 1..100 for 10k queries takes under 10% of
the retrieval time. Both are measured in this process, side by side, on the same data (1M x 128,
1,000 classes, 4 shards) for each backend: exact search (what evaluations use by default) and
ScaNN at the memory's build-time settings (the fastest retrieval, so the hardest ratio).
Writes ``bench-out/eval_cost.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from eval import metrics  # noqa: E402
from memory import Memory, voting, write_memory  # noqa: E402
from search import print_table, timed, write_json  # noqa: E402  (benchmarks/search.py)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--k-max", type=int, default=100)
    ap.add_argument("--backends", default="exact,scann", help="comma list of exact, scann")
    ap.add_argument("--out", default="bench-out/eval_cost.json")
    return ap.parse_args(argv)


def labelled_data(n, queries):
    """``n`` memory items then ``queries`` queries, 128-d around 1,000 class centres (seeded)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, 128)).astype(np.float32)
    labels = rng.integers(0, 1000, n + queries)
    x = centres[labels] + rng.standard_normal((len(labels), 128)).astype(np.float32)
    return x, labels


def bench_retrieval(backend, x, labels, n, k_max):
    """Seconds to search every query in a 4-shard memory of the first ``n`` items, and the neighbours."""
    ids = np.array([f"{i:08d}" for i in range(n)], dtype=object)
    with tempfile.TemporaryDirectory() as tmp:
        write_memory(os.path.join(tmp, "m"), x[:n], labels[:n], ids, num_shards=4, backend=backend,
                     class_names=[str(i) for i in range(1000)])
        with Memory.open(os.path.join(tmp, "m"), verify=False) as mem:
            mem.search(x[n:n + 256], k_max)  # warm-up
            return timed(lambda: mem.search(x[n:], k_max))


def bench_scoring(nb, truth):
    """Seconds to score every rule at every k (what vismem eval calls), and each rule alone."""
    scoring, _ = timed(lambda: metrics.accuracy_all_k(nb.labels, nb.sims, truth, num_classes=1000))
    per_rule = {}
    for method in voting.METHODS:  # each rule alone (repeats the shared set-up)
        per_rule[method], _ = timed(lambda: metrics.accuracy_all_k(nb.labels, nb.sims, truth, num_classes=1000,
                                                                   methods=(method,)))
    return scoring, per_rule


def main(argv=None):
    args = parse_args(argv)
    x, labels = labelled_data(args.n, args.queries)
    rows = []
    for backend in args.backends.split(","):
        retrieval, nb = bench_retrieval(backend, x, labels, args.n, args.k_max)
        scoring, per_rule = bench_scoring(nb, labels[args.n:])
        rows.append({"backend": backend, "retrieval_s": retrieval, "scoring_s": scoring, "per_rule_s": per_rule,
                     "ratio": scoring / retrieval})
        print(f"{backend}: retrieval {retrieval:.2f} s; scoring 4 rules x {args.k_max} k {scoring:.2f} s "
              f"= {100 * scoring / retrieval:.1f}% of retrieval", flush=True)
    write_json(args.out, {"n": args.n, "queries": args.queries, "k_max": args.k_max, "rows": rows})
    print(f"\nmemory {args.n} x 128, 4 shards, {args.queries} queries, k-max {args.k_max}\n")
    print_table(["backend", "retrieval (s)", "scoring, 4 rules x every k (s)", "each rule alone (s)",
                 "scoring / retrieval"],
                [[r["backend"], f"{r['retrieval_s']:.2f}", f"{r['scoring_s']:.2f}",
                  ", ".join(f"{m} {s:.2f}" for m, s in r["per_rule_s"].items()), f"{100 * r['ratio']:.1f}%"]
                 for r in rows])


if __name__ == "__main__":
    main()
