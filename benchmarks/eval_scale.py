"""Evaluation at scale: ``vismem eval`` streamed (Ray Data) beside ``vismem eval --in-process``, N queries x M items.

What it measures. For each query count N (``--queries``), ``vismem eval`` runs as a command in its own
process, watched: its wall time, queries per second (labelled queries / wall time, start-up
included), the peak resident memory (RSS) of the driver and of the largest process it started (Ray's
workers and daemons, sampled every 0.2 s over the whole process tree, ``deploy.ladder.RssWatch``).
The streamed job runs at every N; the in-process evaluation (today's: every query's neighbours held
at once) runs at every N until one fails (a memory kill, say) and not beyond: the largest size it
survives. Both reports are compared figure by figure (they must be equal).

Targets (issue 14): the streamed driver's peak RSS flat in N (it holds fixed-size sums, never
queries x k-max arrays), and the streamed job at least 0.8x the in-process queries/s at 100k queries.

Data: the search benchmark's kind (``benchmarks/search.py``): unit vectors in ``--clusters`` Gaussian
clusters (seeded), 128-d, labels the cluster ids; M items in embedding shards built into a routed
memory by the Beam job (``pipelines.build.build_memory``: k-means partitioning, ``--shards`` shards
of ``--cells`` cells, ScaNN), queries drawn from the same clusters in shards of ``--rows-per-file``
rows, searched with ``--probe-shards`` (each query visits only its nearest shards). Memory and query
shards are kept in ``--work`` and reused by the next run.

Examples::

    # a check at small size (about 5 minutes on 2 cores): 100k items, 20k and 100k queries
    .venv/bin/python benchmarks/eval_scale.py --items 100000 --queries 20000,100000
    # the full ladder (hours; mind the disk: about 0.6 KB per query of per-batch state at k-max 100)
    .venv/bin/python benchmarks/eval_scale.py --items 1000000 --queries 100000,300000,1000000

Writes ``bench-out/eval_scale.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from build import class_names, direct_runner_args, write_inputs  # noqa: E402
from deploy.ladder import RssWatch  # noqa: E402
from search import int_list, print_table, write_json  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000, help="memory items M (default 1,000,000)")
    ap.add_argument("--queries", type=int_list, default="20000,100000",
                    help="query counts N, comma separated, smallest first (default 20000,100000)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000, help="Gaussian clusters, one class each")
    ap.add_argument("--shards", type=int, default=8, help="memory shards (k-means partitions)")
    ap.add_argument("--cells", type=int, default=64, help="k-means cells (at least --shards)")
    ap.add_argument("--probe-shards", type=int, default=1, help="shards each query visits (default 1)")
    ap.add_argument("--k-max", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4096, help="queries per search batch")
    ap.add_argument("--workers", type=int, default=None, help="streamed job's workers (default: the CPUs)")
    ap.add_argument("--rows-per-file", type=int, default=50_000, help="rows per query shard")
    ap.add_argument("--no-in-process", action="store_true", help="run the streamed job alone")
    ap.add_argument("--work", default="bench-out/eval-scale-work", help="data and memories, kept between runs")
    ap.add_argument("--out", default="bench-out/eval_scale.json")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def draw(rng, centres, m):
    """``m`` unit vectors around the clusters' centres (search.py's noise, 0.5), and their clusters."""
    c = rng.integers(0, len(centres), m)
    x = centres[c] + 0.5 * rng.standard_normal((m, centres.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), c


def build(args) -> str:
    """The routed memory of ``--items`` items in ``--work`` (built unless there)."""
    from memory import manifest as mf
    from pipelines.build import build_memory

    path = os.path.join(args.work, f"memory-{args.items}-{args.shards}x{args.cells}")
    if mf.latest_version(path) is not None:
        return path
    centres = np.random.default_rng(args.seed).standard_normal((args.clusters, args.dim)).astype(np.float32)
    x, c = draw(np.random.default_rng([args.seed, 1]), centres, args.items)
    inputs = os.path.join(args.work, f"items-{args.items}")
    os.makedirs(inputs, exist_ok=True)
    write_inputs(inputs, x, c, max(1, args.items // 100_000))
    del x
    log(f"building {path}")
    t = time.perf_counter()
    build_memory(inputs, path, num_shards=args.shards, class_names=class_names(np.arange(args.clusters)),
                 partition="kmeans", kmeans_cells=args.cells, backend="scann", pipeline_args=direct_runner_args(2))
    log(f"built in {time.perf_counter() - t:.0f} s")
    return path


def queries(args, n) -> str:
    """A folder of ``n`` labelled queries from the items' clusters (written unless there)."""
    from memory import schema

    folder = os.path.join(args.work, f"queries-{n}")
    if os.path.isdir(folder):
        return folder
    centres = np.random.default_rng(args.seed).standard_normal((args.clusters, args.dim)).astype(np.float32)
    os.makedirs(folder + ".tmp", exist_ok=True)
    for f, start in enumerate(range(0, n, args.rows_per_file)):
        m = min(args.rows_per_file, n - start)
        q, c = draw(np.random.default_rng([args.seed, 2, f]), centres, m)
        schema.write_embeddings(os.path.join(folder + ".tmp", f"part-{f:05d}.parquet"), schema.embedding_table(
            [f"q{i:09d}" for i in range(start, start + m)], q, c))
    os.replace(folder + ".tmp", folder)
    return folder


def run_eval(args, memory, qfolder, out, in_process: bool) -> dict:
    """``vismem eval`` in its own process, watched over its process tree; its summary and the measures."""
    cmd = [sys.executable, "-m", "cli", "eval", memory, qfolder, "--out", out, "--k-max", str(args.k_max),
           "--batch-size", str(args.batch_size), "--probe-shards", str(args.probe_shards), "--no-progress"]
    if in_process:
        cmd.append("--in-process")
    elif args.workers:
        cmd += ["--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    with RssWatch(proc.pid) as watch:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    res = {"mode": "in-process" if in_process else "streamed", "rc": proc.returncode, "wall_s": wall,
           "driver_rss_mb": watch.driver_peak / 2 ** 20, "largest_worker_rss_mb": watch.worker_peak / 2 ** 20,
           "processes": watch.workers_seen + 1, "cpu_s": watch.cpu_seconds}
    if proc.returncode != 0:
        res["error"] = stderr.decode(errors="replace")[-2000:]
        return res
    summary = json.loads(stdout)
    n = summary["timing"]["queries"]
    res.update(queries=n, qps=n / wall, retrieval_s=summary["timing"]["retrieval_s"],
               scoring_s=summary["timing"]["scoring_all_rules_all_k_s"], batches=summary.get("batches"))
    return res


def figures(out) -> list:
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["figure"] != "timing"]


def main(argv=None):
    args = parse_args(argv)
    if args.queries != sorted(args.queries):
        raise SystemExit("--queries must be given smallest first")
    os.makedirs(args.work, exist_ok=True)
    memory = build(args)
    rows, in_process_alive = [], not args.no_in_process
    for n in args.queries:
        qfolder = queries(args, n)
        out = os.path.join(args.work, f"eval-{n}")
        for mode in ("streamed", "in-process"):
            if mode == "in-process" and not in_process_alive:
                continue
            target = f"{out}-{mode}"
            if os.path.isdir(target):  # a fresh run: no batches to reuse
                import shutil
                shutil.rmtree(target)
            log(f"{mode}: {n} queries")
            res = run_eval(args, memory, qfolder, target, mode == "in-process")
            res["n"] = n
            rows.append(res)
            log(f"  rc {res['rc']}, {res['wall_s']:.1f} s, driver {res['driver_rss_mb']:.0f} MB, largest worker "
                f"{res['largest_worker_rss_mb']:.0f} MB")
            if mode == "in-process" and res["rc"] != 0:
                in_process_alive = False  # the largest size it survives is behind us
        pair = [r for r in rows if r["n"] == n and r["rc"] == 0]
        if len(pair) == 2:
            pair[0]["report_equal"] = figures(f"{out}-streamed") == figures(f"{out}-in-process")
    write_json(args.out, {"args": vars(args), "memory": memory, "rows": rows})
    print(f"\n{args.items:,} items x {args.dim}-d, routed ({args.shards} shards, {args.cells} cells, probe "
          f"{args.probe_shards}), k-max {args.k_max}, batches of {args.batch_size}\n")
    by = {(r["n"], r["mode"]): r for r in rows}
    table = []
    for r in rows:
        other = by.get((r["n"], "in-process"))
        ratio = (f"{r['qps'] / other['qps']:.2f}x" if r["mode"] == "streamed" and other and other["rc"] == 0
                 and r["rc"] == 0 else "")
        table.append([f"{r['n']:,}", r["mode"], "ok" if r["rc"] == 0 else f"failed ({r['rc']})",
                      f"{r['wall_s']:.1f}", f"{r.get('qps', 0):,.0f}", ratio, f"{r['driver_rss_mb']:.0f}",
                      f"{r['largest_worker_rss_mb']:.0f}", {True: "yes", False: "NO"}.get(r.get("report_equal"), "")])
    print_table(["queries", "mode", "run", "wall (s)", "queries/s", "streamed / in-process", "driver RSS (MB)",
                 "largest worker RSS (MB)", "same figures"], table)


if __name__ == "__main__":
    main()
