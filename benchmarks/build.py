"""Build benchmark: the Beam build against the memory core's writer called directly, remove, compact.

k-means routing has its own benchmark: ``benchmarks/routing.py``.

Run: ``.venv/bin/python benchmarks/build.py`` (``--help`` for sizes). Default: the search benchmark's
1M x 128 clustered unit vectors (seeded) in 16 embedding shards, 8 memory shards, ScaNN, the
DirectRunner with 2 worker processes. Everything runs in this one process and machine, side by side,
so the ratios are meaningful on a noisy machine. Expect 20-40 minutes on 2 cores (index builds
dominate). Writes ``bench-out/build.json`` and prints a Markdown table.

Target (issue 4): Beam build wall time at most 1.5x the direct writer.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from memory import Memory, schema, write_memory  # noqa: E402
from memory.mutations import remove_items  # noqa: E402
from pipelines.build import build_memory  # noqa: E402
from pipelines.compact import compact_memory  # noqa: E402
from search import add_data_args, make_data, print_table, timed, write_json  # noqa: E402  (benchmarks/search.py)


def item_ids(n):
    return np.array([f"x{i:08d}" for i in range(n)], dtype=object)


def class_names(labels):
    return [f"c{i}" for i in range(int(labels.max()) + 1)]


def write_inputs(folder, x, labels, files):
    ids = item_ids(len(x))
    for f in range(files):
        sl = slice(len(x) * f // files, len(x) * (f + 1) // files)
        schema.write_embeddings(os.path.join(folder, f"part-{f:05d}.parquet"),
                                schema.embedding_table(ids[sl], x[sl], labels[sl]))
    return ids


def add_beam_args(ap):
    """The Beam build's input and runner options, shared with the routing benchmark."""
    ap.add_argument("--files", type=int, default=16, help="embedding shards (input files)")
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")


def direct_runner_args(workers):
    return ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


def direct_build(folder, out, shards, classes):
    """The memory core's writer called directly: read every embedding shard, then write_memory."""
    parts = [schema.read_embeddings(os.path.join(folder, f)) for f in sorted(os.listdir(folder))]
    write_memory(out, np.concatenate([p["embeddings"] for p in parts]), np.concatenate([p["labels"] for p in parts]),
                 np.concatenate([p["ids"] for p in parts]), num_shards=shards, backend="scann", class_names=classes)


def search_qps(mem, q, k, **kw):
    mem.search(q[:256], k, **kw)  # warm-up
    secs, nb = timed(lambda: mem.search(q, k, **kw))
    return len(q) / secs, nb.ids


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.add_argument("--shards", type=int, default=8)
    add_beam_args(ap)
    ap.add_argument("--work-dir", default=None, help="where the memories go (default: a temporary folder)")
    ap.add_argument("--out", default="bench-out/build.json")
    return ap.parse_args(argv)


def bench_builds(args, inputs, work, classes, res):
    """The direct writer, then the Beam build of the same inputs."""
    res["direct_writer_s"], _ = timed(lambda: direct_build(inputs, os.path.join(work, "direct"), args.shards, classes))
    print(f"direct writer: {res['direct_writer_s']:.1f} s", flush=True)
    res["beam_build_s"], summary = timed(lambda: build_memory(
        inputs, os.path.join(work, "beam"), num_shards=args.shards, class_names=classes, backend="scann",
        pipeline_args=direct_runner_args(args.workers)))
    res["beam_over_direct"] = res["beam_build_s"] / res["direct_writer_s"]
    res["bytes_per_item"] = summary["bytes_per_item"]
    print(f"beam build: {res['beam_build_s']:.1f} s ({res['beam_over_direct']:.2f}x)", flush=True)


def bench_remove_compact(args, ids, q, work, res):
    """Remove 1% of the Beam-built memory's items (then search it), then compact it."""
    beam = os.path.join(work, "beam")
    gone = ids[np.random.default_rng(1).choice(len(ids), len(ids) // 100, replace=False)]
    res["remove_1pct_s"], _ = timed(lambda: remove_items(beam, ids=list(gone)))
    with Memory.open(beam) as mem:
        res["qps_after_remove"], got = search_qps(mem, q, 10)
    assert not set(got.ravel()) & set(gone)
    res["compact_s"], _ = timed(lambda: compact_memory(beam, pipeline_args=direct_runner_args(args.workers)))
    print(f"remove 1%: {res['remove_1pct_s']:.2f} s; compact: {res['compact_s']:.1f} s", flush=True)


def print_report(res, workers):
    print()
    print_table(["step", "seconds"], [
        ["direct writer (read + write_memory)", f"{res['direct_writer_s']:.1f}"],
        [f"Beam build ({workers} workers)", f"{res['beam_build_s']:.1f} ({res['beam_over_direct']:.2f}x)"],
        ["remove 1%", f"{res['remove_1pct_s']:.2f}"],
        ["compact", f"{res['compact_s']:.1f}"]])


def main(argv=None):
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="vismem-bench-build-")
    os.makedirs(work, exist_ok=True)
    x, labels, q = make_data(args.n, args.dim, args.clusters, args.queries, seed=0)
    classes = class_names(labels)
    inputs = os.path.join(work, "emb")
    os.makedirs(inputs, exist_ok=True)
    ids = write_inputs(inputs, x, labels, args.files)
    res = {"n": args.n, "dim": args.dim, "shards": args.shards, "files": args.files, "workers": args.workers}
    print(f"data: {args.n} x {args.dim} in {args.files} files; building {args.shards} ScaNN shards", flush=True)
    bench_builds(args, inputs, work, classes, res)
    bench_remove_compact(args, ids, q, work, res)
    shutil.rmtree(os.path.join(work, "direct"), ignore_errors=True)
    write_json(args.out, res)
    print_report(res, args.workers)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
