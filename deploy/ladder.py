"""One point of the scale ladder: synthetic embedding shards, a watched Beam build, and the built memory's figures.

Used by ``benchmarks/scale.py`` (the measured ladder behind ``deploy/calibration.json``) and by
``vismem plan --calibrate`` (a mini ladder on the user's machine). Every figure is measured here:
build wall time, peak RSS of the Beam driver and of its largest worker process, bytes on disk per
item (by file kind), open time and RAM per item once open, routed queries/s at a recall target
(against brute force on a query sample) and the time to remove 0.1% of the items.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import pyarrow.parquet as pq

CLUSTERS = 1000  # class count: the search benchmark's 1,000 Gaussian clusters, one class each
NOISE = 0.5
# A ladder memory grows at constant density: one Gaussian cluster per 1,000 items (the search
# benchmark's 1M items in 1,000 clusters), so every size sees neighbourhoods alike. With the
# clusters fixed, each grows with n and a query's neighbours crowd into fewer cells and leaves:
# routed queries got cheaper as the memory grew (1,870 -> 6,495 q/s from 250k to 2.5M items), and
# no fit to size could extrapolate that.
ITEMS_PER_CLUSTER = 1000


def clusters_for(n: int) -> int:
    """Clusters of an ``n``-item ladder memory: at least ``CLUSTERS``, one per ``ITEMS_PER_CLUSTER`` items."""
    return max(CLUSTERS, -(-int(n) // ITEMS_PER_CLUSTER))


class RssWatch:
    """Peak resident memory and CPU seconds of a process (``pid``, default this one: the Beam driver)
    and of each descendant (its workers), sampled every ``interval`` seconds in a thread; a context manager."""

    def __init__(self, pid: int | None = None, interval: float = 0.2):
        import psutil

        self.interval = interval
        self.me = psutil.Process(pid or os.getpid())
        self.peaks: dict[int, int] = {}
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self._initial = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-watch")

    def _sample(self):
        import psutil

        try:
            tree = [self.me, *self.me.children(recursive=True)]
        except psutil.NoSuchProcess:  # the watched process has exited
            return
        for proc in tree:
            try:
                with proc.oneshot():
                    rss, cpu = proc.memory_info().rss, proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            used = cpu.user + cpu.system
            # Processes already running when the watch starts count from then; new ones from zero.
            self.cpu_first.setdefault(proc.pid, used if self._initial else 0.0)
            self.cpu_last[proc.pid] = used

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._sample()
        self._initial = False
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def driver_peak(self) -> int:
        return self.peaks.get(self.me.pid, 0)

    @property
    def worker_peak(self) -> int:
        return max((v for pid, v in self.peaks.items() if pid != self.me.pid), default=0)

    @property
    def workers_seen(self) -> int:
        return len(self.peaks) - 1

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of the whole tree while watched (a worker's last interval may be missed)."""
        return sum(self.cpu_last[p] - self.cpu_first[p] for p in self.cpu_last)


def cluster_centres(dim: int, seed: int, clusters: int = CLUSTERS) -> np.ndarray:
    """The first ``clusters`` centres of one seeded stream: a larger memory keeps a smaller one's centres."""
    return np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)


def draw_items(rng, centres, m):
    c = rng.integers(0, len(centres), m)
    x = centres[c] + NOISE * rng.standard_normal((m, centres.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), c


def item_id(i: int) -> str:
    return f"x{i:010d}"


def write_synthetic(folder: str, n: int, dim: int, *, rows_per_file: int = 250_000, seed: int = 0) -> list[str]:
    """``n`` clustered unit vectors (:func:`clusters_for` clusters, labels cluster mod ``CLUSTERS``) in
    embedding shards of ``rows_per_file`` rows, one file at a time (never all rows in memory); the same
    ``seed`` gives the same rows. Returns the file paths."""
    from memory import schema

    os.makedirs(folder, exist_ok=True)
    centres = cluster_centres(dim, seed, clusters_for(n))
    files = []
    for f, start in enumerate(range(0, n, rows_per_file)):
        m = min(rows_per_file, n - start)
        x, c = draw_items(np.random.default_rng([seed, f]), centres, m)
        ids = np.array([item_id(i) for i in range(start, start + m)], dtype=object)
        path = os.path.join(folder, f"part-{f:05d}.parquet")
        schema.write_embeddings(path, schema.embedding_table(ids, x, c % CLUSTERS))
        files.append(path)
    return files


def synthetic_queries(count: int, dim: int, *, seed: int = 0, n: int = CLUSTERS) -> np.ndarray:
    """Queries from the distribution of an ``n``-item memory's items (another stream of its clusters)."""
    return draw_items(np.random.default_rng([seed, 1 << 30]), cluster_centres(dim, seed, clusters_for(n)), count)[0]


def class_names() -> list[str]:
    return [f"c{i}" for i in range(CLUSTERS)]


def exact_top(files: list[str], queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Ids of each query's exact top ``k`` over the embedding shards, streamed one file at a time."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.empty((len(queries), 0), dtype=object)
    for path in files:
        t = pq.read_table(path, columns=["id", "embedding"])
        x = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(t), -1).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = np.asarray(t.column("id").to_pylist(), dtype=object)
        s = queries @ x.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        best_i = np.concatenate([best_i, ids[top]], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall_at(got: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(g[:k]) & set(t[:k])) / k for g, t in zip(got, truth)]))


_BUILD = """
import json, sys
from pipelines.build import build_memory
a = json.loads(sys.argv[1])
s = build_memory(a.pop("inputs"), a.pop("out"), backend="scann", **a)
print("SUMMARY " + json.dumps(s, default=str))
"""


def watched_build(inputs, out: str, *, num_shards: int, workers: int, partition: str = "kmeans",
                  kmeans_sample: int | None = None, names=None) -> dict:
    """The Beam build (multi-process DirectRunner) of ``inputs`` at ``out`` in a fresh driver process,
    watched: wall and CPU seconds of the process tree, peak RSS of the driver and of its largest worker."""
    import json
    import subprocess
    import sys

    spec = {"inputs": inputs, "out": out, "num_shards": num_shards, "class_names": names or class_names(),
            "partition": partition, "kmeans_sample": kmeans_sample,
            "pipeline_args": ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                              f"--direct_num_workers={workers}"]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    log_path = os.path.join(os.path.dirname(os.path.abspath(out)), "build.log")
    t = time.perf_counter()
    with open(log_path, "w") as errors:
        proc = subprocess.Popen([sys.executable, "-c", _BUILD, json.dumps(spec)], stdout=subprocess.PIPE,
                                stderr=errors, text=True, env=env)
        with RssWatch(proc.pid) as watch:
            stdout, _ = proc.communicate()
    seconds = time.perf_counter() - t
    found = [line[len("SUMMARY "):] for line in stdout.splitlines() if line.startswith("SUMMARY ")]
    if proc.returncode or not found:
        with open(log_path) as f:
            last = [line for line in f.read().splitlines() if "Error" in line][-1:]
        raise RuntimeError(f"the build of {out} failed (exit {proc.returncode}): {last}; see {log_path}")
    summary = json.loads(found[-1])
    return {"build_wall_s": seconds, "build_cpu_s": watch.cpu_seconds, "driver_rss": watch.driver_peak,
            "worker_rss": watch.worker_peak, "workers_seen": watch.workers_seen,
            "bytes_per_item": summary["bytes_per_item"], "shard_items_max": max(s["count"] for s in summary["shards"]),
            "shards": len(summary["shards"])}


def bytes_by_kind(out: str) -> dict:
    """Bytes per item on disk of the latest version's shard files, by file kind (index, vectors, items)."""
    from memory import manifest as mf

    m = mf.read_manifest(out)
    kinds: dict[str, int] = {}
    for e in m.shards:
        for rel, f in e.files.items():
            kind = rel.split("/")[0]
            kinds[kind] = kinds.get(kind, 0) + f["bytes"]
    n = max(sum(e.count for e in m.shards), 1)
    return {k: v / n for k, v in sorted(kinds.items())}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Routed-search settings tried, cheapest first: probe_shards x leaves searched per shard."""

    probes: tuple = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    leaf_factors: tuple = (0.5, 1.0, 2.0, 4.0, 8.0)  # times each shard's build-time num_leaves_to_search
    reorder: int = 100
    targets: tuple = (0.9, 0.95, 0.99)


def measured(fn, n_queries: int, repeat: int = 1) -> tuple[float, float, object]:
    """``(wall s, CPU s of this process, result)`` of ``fn()``: the fastest of ``repeat`` runs after a
    warm-up (on a shared machine the fastest run is the one least disturbed)."""
    out = fn()
    best_w, best_c = float("inf"), float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best_w, best_c = min(best_w, time.perf_counter() - w), min(best_c, time.process_time() - c)
    return best_w, best_c, out


def leaf_base(mem) -> int | None:
    """The shards' median build-time leaves searched; None when every shard is brute force (no leaves)."""
    trees = [s.entry.params for s in mem.shards if not s.entry.params.get("brute_force")]
    return int(np.median([p.get("num_leaves_to_search", 1) for p in trees])) if trees else None


def routed_curve(mem, queries, truth, sweep: Sweep) -> list[dict]:
    """recall@10, q/s and CPU per query (fastest of 3 runs) of routed search over the sweep. At each probe count, leaves
    grow until the highest target is met or recall stops growing (the reorder depth caps it); probe
    counts grow until one meets the highest target at its first setting, or recall stops growing."""
    base = leaf_base(mem)
    n_parts = mem.manifest.num_partitions or len(mem.shards)
    top, curve, last_best = max(sweep.targets), [], -1.0
    for p in [p for p in sweep.probes if p <= n_parts]:
        at_p = []
        for f in sweep.leaf_factors if base else (None,):
            leaves = max(1, round(base * f)) if base else None
            wall, cpu, nb = measured(lambda: mem.search(queries, 10, probe_shards=p, leaves_to_search=leaves,
                                                         reorder=sweep.reorder), len(queries), repeat=3)
            at_p.append({"probe_shards": p, "leaves": leaves, "recall@10": recall_at(nb.ids, truth),
                         "qps": len(queries) / wall, "cpu_s_per_query": cpu / len(queries)})
            flat = len(at_p) > 1 and at_p[-1]["recall@10"] < at_p[-2]["recall@10"] + 1e-3
            if at_p[-1]["recall@10"] >= top or flat:
                break
        curve += at_p
        best = max(r["recall@10"] for r in at_p)
        if at_p[0]["recall@10"] >= top or best < last_best + 1e-3:
            break
        last_best = best
    return curve


def best_at(curve: list[dict], target: float) -> dict | None:
    """The cheapest point (least CPU per query) at recall@10 >= ``target``."""
    ok = [r for r in curve if r["recall@10"] >= target]
    return min(ok, key=lambda r: r["cpu_s_per_query"]) if ok else None


def one_query_latency(mem, queries, setting: dict, count: int = 100) -> float:
    """Median seconds of a search of one query alone at ``setting``."""
    times = []
    for q in queries[:count]:
        t = time.perf_counter()
        mem.search(q[None], 10, probe_shards=setting["probe_shards"], leaves_to_search=setting["leaves"], reorder=100)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


_OPEN_RSS = """
import gc, json, os, sys, time
import psutil
from memory import Memory, manifest
from memory.shard import Shard
root = sys.argv[1]
# One shard opened first and kept: imports and first-use state are then not counted as the memory's RAM.
warm = Shard.open(root, min(manifest.read_manifest(root).shards, key=lambda e: e.count))
gc.collect()
me = psutil.Process()
before = me.memory_info().rss
t = time.perf_counter()
mem = Memory.open(root)
print(json.dumps({"base": before, "added": me.memory_info().rss - before, "items": len(mem),
                  "open_s": time.perf_counter() - t}), flush=True)
mem.close()
os._exit(0)  # measured: skip native teardown (it once aborted at exit, after the figures were out)
"""


def open_rss(path: str) -> dict:
    """``{base, added, items, open_s}``: RSS of a fresh process before opening the memory at ``path``
    and what opening added (a fresh process, so no freed memory of earlier work is reused; ``base``
    includes one of its shards, opened first to load the code)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run([sys.executable, "-c", _OPEN_RSS, path], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"opening {path} in a fresh process failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def open_and_search(out: str, queries, truth, sweep: Sweep) -> dict:
    """Open time and RAM per item (in a fresh process), and routed search at each recall target."""
    from memory import Memory

    fresh = open_rss(out)
    t = time.perf_counter()
    mem = Memory.open(out)
    open_s = time.perf_counter() - t
    try:
        curve = routed_curve(mem, queries, truth, sweep)
        targets = {}
        for target in sweep.targets:
            best = best_at(curve, target)
            if best is not None:
                targets[str(target)] = {**best, "latency_s": one_query_latency(mem, queries, best)}
        shards = len(mem.shards)
    finally:
        mem.close()
    return {"open_s": open_s, "serve_ram_bytes": fresh["added"],
            "serve_ram_per_item": fresh["added"] / max(fresh["items"], 1),
            "serve_base_rss": fresh["base"], "shards": shards, "query": targets, "curve": curve}


def timed_removal(out: str, n: int, fraction: float = 0.001, seed: int = 1) -> dict:
    """Seconds to remove ``fraction`` of the items by id (``memory.mutations.remove_items``)."""
    from memory.mutations import remove_items

    count = max(1, int(n * fraction))
    gone = [item_id(int(i)) for i in np.random.default_rng(seed).choice(n, count, replace=False)]
    t = time.perf_counter()
    remove_items(out, ids=gone)
    return {"remove_s": time.perf_counter() - t, "removed": count}


def measure_point(work: str, n: int, *, dim: int, shard_items: int, workers: int, queries: int = 1000,
                  sweep: Sweep = Sweep(), rows_per_file: int = 250_000, keep: bool = False, log=print) -> dict:
    """Every ladder figure of one memory of ``n`` items in ``ceil(n / shard_items)`` k-means shards."""
    import math
    import shutil

    folder = os.path.join(work, f"n{n}-s{shard_items}-d{dim}")
    inputs, out = os.path.join(folder, "emb"), os.path.join(folder, "memory")
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    files = write_synthetic(inputs, n, dim, rows_per_file=min(rows_per_file, max(shard_items, 1000)))
    point = {"n": n, "dim": dim, "shard_items": shard_items, "workers": workers, "files": len(files),
             "input_bytes_per_item": sum(os.path.getsize(f) for f in files) / n,
             "write_inputs_s": time.perf_counter() - t}
    log(f"n={n:,}: inputs written in {point['write_inputs_s']:.0f} s; building {math.ceil(n / shard_items)} shards")
    point.update(watched_build(inputs, out, num_shards=math.ceil(n / shard_items), workers=workers))
    point["bytes_by_kind"] = bytes_by_kind(out)
    log(f"n={n:,}: built in {point['build_wall_s']:.0f} s ({point['build_cpu_s']:.0f} CPU s), driver "
        f"{point['driver_rss'] / 2**20:.0f} MiB, worker {point['worker_rss'] / 2**20:.0f} MiB")
    q = synthetic_queries(queries, dim, n=n)
    t = time.perf_counter()
    truth = exact_top(files, q)
    point["truth_s"] = time.perf_counter() - t
    point.update(open_and_search(out, q, truth, sweep))
    log(f"n={n:,}: open {point['open_s']:.1f} s; " + ", ".join(
        f"recall {k}: {v['qps']:,.0f} q/s (P={v['probe_shards']}, leaves {v['leaves']})"
        for k, v in point["query"].items()))
    point.update(timed_removal(out, n))
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return point
