"""Pruning benchmark: ``vismem prune``'s Beam job on an N-item memory, beside the in-process pruning core.

Run: ``.venv/bin/python benchmarks/prune_scale.py --sizes 50000,200000`` (``--help`` for every option;
about 6 minutes on 2 cores at those sizes, most of it building the memories).

For each size N it writes a memory of N synthetic clustered 128-d unit vectors (``search.make_data``:
1,000 Gaussian clusters, seeded, the cluster as the label, ``--label-noise`` of the labels replaced by
another class so that pruning has something to find) in ``--shards`` shards (ScaNN by default:
trees once a shard is large enough), then prunes it two ways, each in a fresh process watched by
``deploy.ladder.RssWatch`` (peak resident memory of that process and of every process it starts):

- ``beam``: ``pipelines.prune.prune_memory`` (what ``vismem prune`` runs) on the multi-process
  DirectRunner with ``--workers`` workers: each worker opens the whole memory once and counts the
  shards it is given; the driver holds only paths and the summary. Publishes a soft-pruned version.
- ``in-process core``: ``eval.pruning`` as the experiments used it before pruning was a memory
  operation: one search of every item at self-k + 1 in one process, ``wrong_contributions`` and
  the soft weights; nothing is published. It runs at each size until a size fails (its process
  killed or an error), and is not tried above it: "the largest size it survives".

Reported per size and engine: wall seconds (the child process, start-up included), items/s, peak
RSS of the driver and of its largest worker (MB), and the items with v > 0 and the wrong votes, which
must agree between the two engines (the oracle of ``tests/test_prune.py``, here at scale).
Writes ``bench-out/prune_scale.json`` and prints a Markdown table. Memory build time is not counted.
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
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from deploy.ladder import RssWatch  # noqa: E402
from search import make_data, print_table, write_json  # noqa: E402

_BEAM = """
import json, sys
from pipelines.prune import prune_memory
spec = json.loads(sys.argv[1])
s = prune_memory(spec["root"], self_k=spec["self_k"], soft=True, pipeline_args=spec["pipeline_args"])
print("SUMMARY " + json.dumps({"items_with_wrong": s["items_with_wrong"], "wrong_votes": s["wrong_votes"],
                              "version": s["version"], "reweighted_shards": s["reweighted_shards"],
                              "job_s": s["wall_seconds"]}))
"""

_CORE = """
import json, sys, time
import numpy as np
from eval import pruning
from memory import Memory
from memory import manifest as mf
from memory.items import read_items
from memory.shard import read_vectors
spec = json.loads(sys.argv[1])
root, k = spec["root"], spec["self_k"]
t = time.perf_counter()
m = mf.read_manifest(root, 1)
ids = np.concatenate([np.asarray(read_items(root, e, ["id"]).column("id").to_pylist(), dtype=object) for e in m.shards])
labels = np.concatenate([read_items(root, e, ["label"]).column("label").to_numpy() for e in m.shards])
x = np.concatenate([read_vectors(root, e, np.arange(e.count)) for e in m.shards])
with Memory.open(root, 1) as mem:
    nb = mem.search(x, k + 1)
v = pruning.wrong_contributions(ids, labels, nb.ids, nb.labels, ids, k=k)
w = pruning.soft_weights(v)
print("SUMMARY " + json.dumps({"items_with_wrong": int((v > 0).sum()), "wrong_votes": int(v.sum()),
                              "job_s": time.perf_counter() - t}))
"""


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50000,200000", help="memory sizes N, comma list (default 50000,200000)")
    ap.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128)")
    ap.add_argument("--clusters", type=int, default=1000, help="Gaussian clusters, also the classes (default 1000)")
    ap.add_argument("--label-noise", type=float, default=0.05,
                    help="fraction of items given a wrong label, seeded (default 0.05; clean clusters of 50 or "
                         "more items give v = 0 everywhere)")
    ap.add_argument("--shards", type=int, default=4, help="shards of each memory (default 4)")
    ap.add_argument("--backend", choices=("scann", "exact"), default="scann", help="index backend (default scann)")
    ap.add_argument("--self-k", type=int, default=10, help="neighbours per self-query that count (default 10)")
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes (default 2)")
    ap.add_argument("--no-core", action="store_true", help="skip the in-process core")
    ap.add_argument("--workdir", default=None, help="where the memories go (default: a temporary folder)")
    ap.add_argument("--out", default=os.path.join("bench-out", "prune_scale.json"), help="the JSON results file")
    return ap.parse_args(argv)


def watched(script: str, spec: dict, log_path: str) -> dict:
    """Run ``script`` in a fresh Python process, watched; its SUMMARY plus wall seconds and peak RSS (MB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(spec)], stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env)
        with RssWatch(proc.pid) as watch:
            stdout, _ = proc.communicate()
    found = [line[len("SUMMARY "):] for line in stdout.splitlines() if line.startswith("SUMMARY ")]
    out = {"wall_s": time.perf_counter() - t, "driver_rss_mb": watch.driver_peak / 2**20,
           "worker_rss_mb": watch.worker_peak / 2**20, "workers_seen": watch.workers_seen,
           "exit": proc.returncode, "log": log_path}
    if proc.returncode == 0 and found:
        out.update(json.loads(found[-1]))
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    from memory import write_memory

    sizes = [int(s) for s in a.sizes.split(",")]
    workdir = a.workdir or tempfile.mkdtemp(prefix="vismem-prune-bench-")
    pipe = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={a.workers}"]
    results, core_alive = [], not a.no_core
    for n in sizes:
        x, labels, _ = make_data(n, a.dim, a.clusters, 1, seed=0)
        rng = np.random.default_rng(1)
        wrong = rng.random(n) < a.label_noise
        labels[wrong] = (labels[wrong] + rng.integers(1, a.clusters, int(wrong.sum()))) % a.clusters
        ids = [f"x{i:010d}" for i in range(n)]
        root = os.path.join(workdir, f"m{n}")
        t = time.perf_counter()
        write_memory(root, x, labels, ids, num_shards=a.shards, backend=a.backend,
                     class_names=[str(c) for c in range(a.clusters)])
        build_s = time.perf_counter() - t
        del x
        spec = {"root": root, "self_k": a.self_k, "pipeline_args": pipe}
        runs = [("beam", _BEAM)] + ([("in-process core", _CORE)] if core_alive else [])
        for engine, script in runs:
            r = watched(script, spec, os.path.join(workdir, f"m{n}-{engine.split()[0]}.log"))
            r.update(size=n, engine=engine, build_s=build_s, items_per_s=n / r["wall_s"])
            results.append(r)
            if engine != "beam" and r["exit"] != 0:
                core_alive = False  # the largest size it survives was the previous one
            print(json.dumps(r), flush=True)
    write_json(a.out, {"args": vars(a), "results": results})
    print_table(["N", "engine", "wall s", "items/s", "driver RSS MB", "largest worker RSS MB", "items v>0",
                 "wrong votes", "exit"],
                [[r["size"], r["engine"], f"{r['wall_s']:.1f}", f"{r['items_per_s']:,.0f}", f"{r['driver_rss_mb']:.0f}",
                  f"{r['worker_rss_mb']:.0f}" if r["workers_seen"] else "-", r.get("items_with_wrong", "-"),
                  r.get("wrong_votes", "-"), r["exit"]] for r in results])
    return {"results": results}


if __name__ == "__main__":
    main()
