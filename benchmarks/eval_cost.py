"""Cost of scoring every voting rule at every k against the retrieval pass it comes from.

Run: ``.venv/bin/python benchmarks/eval_cost.py`` (about 2 minutes). Target (evaluation issue):
scoring all four rules at every k = 1..100 for 10k queries takes under 10% of the retrieval time.
Both are measured in this process, side by side, on the same memory (1M x 128 exact by default,
1,000 classes).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eval import metrics  # noqa: E402
from memory import Memory, write_memory  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--k-max", type=int, default=100)
    ap.add_argument("--backend", default="exact", choices=["exact", "scann"])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, 128)).astype(np.float32)
    labels = rng.integers(0, 1000, args.n + args.queries)
    x = centres[labels] + rng.standard_normal((len(labels), 128)).astype(np.float32)
    ids = np.array([f"{i:08d}" for i in range(args.n)], dtype=object)
    with tempfile.TemporaryDirectory() as tmp:
        write_memory(os.path.join(tmp, "m"), x[:args.n], labels[:args.n], ids, num_shards=4, backend=args.backend,
                     class_names=[str(i) for i in range(1000)])
        with Memory.open(os.path.join(tmp, "m"), verify=False) as mem:
            t = time.perf_counter()
            nb = mem.search(x[args.n:], args.k_max)
            retrieval = time.perf_counter() - t
    t = time.perf_counter()
    acc = metrics.accuracy_all_k(nb.labels, nb.sims, labels[args.n:], num_classes=1000)
    scoring = time.perf_counter() - t
    print(f"memory {args.n} x 128 ({args.backend}, 4 shards), {args.queries} queries, k-max {args.k_max}")
    print(f"retrieval {retrieval:.2f} s; scoring 4 rules x {args.k_max} k {scoring:.2f} s "
          f"= {100 * scoring / retrieval:.1f}% of retrieval")
    print("best rank-voting accuracy", round(float(acc["rank"].max()), 4))


if __name__ == "__main__":
    main()
