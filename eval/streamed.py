"""``vismem eval`` as a streamed job: query shards read batch by batch on Ray Data, additive statistics per batch.

The engine is Ray Data. Retrieval needs the memory opened (its indices loaded: heavy state, built
once per worker, STYLE 4), and for memories larger than one machine the shards already live in Ray
actors (``memory.ray_shards``) that the workers can call; a Ray Data actor pool keeps one opened
memory per worker across batches, streams its inputs with backpressure, and runs on the same local
instance or cluster as the rest of vismem's Ray work. Beam, which builds memories here, would reopen
the memory per bundle or need a shared-state side channel for it, and its local runner is slow on
the many small numpy batches this job makes.

Stages:

1. At the door, from the Parquet footers (``eval.query_batches``): encoder, dimension, row counts,
   labels; the batches are cut (up to ``--batch-size`` rows of one shard each, named by shard and
   position) and the run's identity is written, or checked, under ``OUT/batches/run.json``.
2. Ray Data feeds groups of batches to a pool of :class:`EvalWorker` actors. Each worker reads its
   batches from the shard (local or ``gs://``), searches each batch's labelled rows at k-max
   (in-process shards, Ray-hosted ones, or routed with ``probe_shards``) and writes, atomically,
   the batch's neighbour lists (``KEY.nb.npz``) and then its additive statistics
   (``KEY.stats.npz``, ``eval.batch_stats``): a batch is done when its statistics are there. A
   rerun with the same inputs (a killed run, say) skips every done batch; with other inputs it is
   refused, the difference named.
3. The driver adds the statistics up, one file at a time, and makes every figure of the in-process
   evaluation from them; each rule's best k is then known, and one pass over the kept neighbour
   lists gives the confidences at those k: reliability bins (summed exactly), a 1/1000 histogram
   for the plotted curve, and the risk-coverage points by exact selection (``eval.selection``).
4. The report is written by ``eval.evaluate.write_outputs``, as the in-process evaluation writes
   it: the same figures, to the last bit (tested).

Memory: a worker holds the opened memory, one batch and a bounded read buffer; the driver holds the
plan of batches and fixed-size sums, whatever the number of queries. Disk: the neighbour lists
(about 6 bytes per neighbour, 600 per query at k-max 100) stay under ``OUT/batches``, for reruns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from eval import batch_stats, calibration, evaluate as inprocess, metrics, query_batches, selection
from eval.batch_store import STATE_FORMAT, BatchStore
from memory import manifest as mf
from memory import output_paths, schema, storage, voting
from memory.partition import check_margin, check_routing
from memory.query import check_k, positive_ints, search_batch

# Settings the workers need to see as the driver does (storage endpoints, credentials): forwarded to
# them when this process starts Ray or connects to a cluster (as ``vismem embed`` does).
FORWARDED_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "GOOGLE_APPLICATION_CREDENTIALS")
TASKS_PER_WORKER = 4  # groups of batches per worker: a few, so that a slow one does not hold up the end


@dataclasses.dataclass(frozen=True)
class Job:
    """What every worker needs: paths and settings, never opened objects (they are opened on the worker)."""

    memory: str
    version: int
    out_dir: str
    k_max: int
    ties: str
    seed: int
    probe_shards: int | None
    num_classes: int
    where: object = None  # memory.filters.ItemFilter (picklable), or None
    probe_margin: float | None = None


def run_batches(mem, job: Job, batches: list, store: BatchStore) -> int:
    """Search and score ``batches`` (of one file, ascending), reading the file once; skip those already
    done (a retried task). Returns the labelled queries scored. The work of one :class:`EvalWorker` call.

    Raises:
        ValueError: a label outside the memory's classes (the file named).
    """
    scored = 0
    todo = [b for b in batches if not store.done(b)]
    for batch, rows in query_batches.read_batches(todo):
        if batch.kind == "ood":
            nb = _search(mem, job, rows["embeddings"], batch)
            store.write(batch.key, batch_stats.ood_stats(nb.sims))
            continue
        known = rows["labels"] >= 0
        if not known.any():
            store.write(batch.key, {"n": np.int64(0), "n_tune": np.int64(0)}, {})
            continue
        truth = rows["labels"][known]
        if truth.max() >= job.num_classes:
            raise ValueError(f"queries {batch.path}: labels reach {truth.max()}, but memory {job.memory} has "
                             f"{job.num_classes} classes (labels 0..{job.num_classes - 1}, -1 unknown)")
        t0 = time.perf_counter()
        nb = _search(mem, job, rows["embeddings"][known], batch)
        t1 = time.perf_counter()
        stats = batch_stats.query_stats(nb.labels, nb.sims, nb.weights, truth,
                                        batch_stats.held_out_tune(rows["ids"][known], job.seed),
                                        num_classes=job.num_classes, ties=job.ties)
        stats.update(retrieval_s=np.float64(t1 - t0), scoring_s=np.float64(time.perf_counter() - t1))
        kept = {"labels": nb.labels.astype(np.int16 if job.num_classes < 2 ** 15 else np.int32), "sims": nb.sims,
                "truth": truth.astype(np.int32)}
        if nb.weights is not None and np.any(nb.weights != 1):  # all ones votes as no weights, to the bit
            kept["weights"] = nb.weights
        store.write(batch.key, stats, kept)
        scored += len(truth)
    return scored


def _search(mem, job: Job, queries, batch):
    """The batch's neighbours at k-max; a refused query (NaN, zero) named with its file and rows."""
    try:
        return mem.search(queries, job.k_max, probe_shards=job.probe_shards, probe_margin=job.probe_margin,
                          where=job.where)
    except ValueError as exc:
        raise ValueError(f"{batch.path} (rows {batch.start}..{batch.stop - 1}): {exc}") from None


class EvalWorker:
    """The Ray Data actor: opens the memory once, then runs groups of batches (JSON lists of
    :class:`eval.query_batches.Batch`) through :func:`run_batches`.

    A refused input or a lost shard is not a crash: it comes back as a row (``error_type``, ``error``)
    that the driver raises as it is, one line, where Ray would wrap it in its own traceback.
    """

    def __init__(self, job: dict, shards=None, where=None):
        self.job = Job(**{**job, "where": where})  # the filter travels pickled, not as asdict's plain dict
        self.mem = open_memory(self.job, shards)
        self.store = BatchStore(self.job.out_dir)

    def __call__(self, rows: dict) -> dict:
        from memory.ray_shards import ShardLost

        out = {"batches": [], "queries": [], "error_type": [], "error": []}
        for text in rows["task"]:
            batches = [query_batches.Batch(**b) for b in json.loads(str(text))]
            try:
                scored, kind, message = run_batches(self.mem, self.job, batches, self.store), "", ""
            except (ValueError, FileNotFoundError, ShardLost) as exc:
                scored, kind, message = 0, type(exc).__name__, str(exc)
            for key, value in zip(out, (len(batches), scored, kind, message)):
                out[key].append(value)
        return {k: np.array(v) for k, v in out.items()}


def open_memory(job: Job, shards=None):
    """The memory a worker searches: its own in-process shards, or proxies of Ray-hosted ones (``shards``)."""
    from memory.fanout import ThreadFanout
    from memory.memory import Memory

    if shards is None:
        return Memory.open(job.memory, job.version)
    return Memory(job.memory, mf.read_manifest(job.memory, job.version), shards, ThreadFanout(max(len(shards), 1)))


def evaluate_streamed(memory_path: str, queries_path: str, out_dir: str, *, k_max: int = 100,
                      ood_queries_path: str | None = None, batch_size: int = 4096, seed: int = 0,
                      version: int | None = None, ray_address: str | None = None, reranker=None,
                      rerank_k: int = 50, rerank_queries: int = 200, probe_shards: int | None = None,
                      ties: str = "nearest", workers: int | None = None, progress: bool = True,
                      where=None, probe_margin: float | None = None) -> dict:
    """:func:`eval.evaluate.evaluate`'s report, from query shards streamed through Ray Data (module docstring).

    Without ``ray_address`` a local Ray instance is started (or the connected one used) and every
    worker opens the memory itself; with one (a cluster address, or ``local``) the shards are hosted
    in Ray actors on that cluster and the workers call them. ``workers`` (default: the cluster's
    CPUs) is the size of the actor pool. Per-batch state is kept under ``OUT/batches``: a rerun
    reuses every batch a killed run finished.

    Returns:
        the summary :func:`eval.evaluate.evaluate` returns, with ``batches``: planned, reused, computed.

    Raises:
        ValueError: what the in-process evaluation refuses (bad sizes or tie rule, queries of another
            encoder or dimension, no labelled query, labels outside the memory's classes, k-max above
            its live items, ``probe_shards`` on a memory without centroids), and an ``OUT/batches``
            of another evaluation.
        FileNotFoundError: no memory, no such version, or no query shards.
    """
    positive_ints(k_max=k_max, batch_size=batch_size, rerank_k=rerank_k, rerank_queries=rerank_queries,
                  workers=workers)
    voting.check_ties(ties)
    output_paths.check_folder(out_dir, "--out")
    manifest = mf.read_manifest(memory_path, version)
    qfiles = query_batches.describe(schema.shard_files(queries_path))
    query_batches.check(qfiles, manifest, memory_path, queries_path)
    check_k(k_max, manifest, memory_path, "k-max")
    check_margin(probe_margin)
    check_routing(manifest.partitioning, probe_shards, probe_margin, memory_path)
    ofiles = []
    if ood_queries_path:
        ofiles = query_batches.describe(schema.shard_files(ood_queries_path))
        query_batches.check(ofiles, manifest, memory_path, ood_queries_path, what="out-of-distribution queries",
                            labelled=False)
    # The report names the paths as given; the workers, which need not share this working directory, get them whole.
    qfiles_abs = [dataclasses.replace(f, path=_absolute(f.path)) for f in qfiles]
    ofiles_abs = [dataclasses.replace(f, path=_absolute(f.path)) for f in ofiles]
    rows = search_batch(batch_size, k_max)
    batches = query_batches.plan(qfiles_abs, rows, "q") + query_batches.plan(ofiles_abs, rows, "ood")
    job = Job(_absolute(memory_path), manifest.version, os.path.abspath(out_dir), k_max, ties, seed, probe_shards,
              len(manifest.class_names), where, probe_margin)
    store = BatchStore(job.out_dir)
    t0 = time.perf_counter()
    hosted = bool(ray_address)
    used_workers, reranked = 0, None
    with store.kept_only_if_useful():
        store.claim(_identity(job, qfiles_abs, ofiles_abs, rows))
        todo = [b for b in batches if not store.done(b)]
        if todo or (reranker is not None):
            with _ray_session(ray_address), _driver_memory(job, hosted, hosted or reranker is not None) as mem:
                if todo:
                    used_workers = _run_on_ray(job, todo, store, workers, mem.shards if hosted else None, progress)
                if reranker is not None:
                    q, truth, uris = _first_labelled([b for b in batches if b.kind == "q"], qfiles, rerank_queries)
                    reranked = inprocess.rerank(mem, memory_path, reranker, q, truth, uris, min(rerank_k, k_max),
                                                ties)
    missing = [b.key for b in batches if not store.done(b)]
    if missing:
        raise RuntimeError(f"the evaluation ended with {len(missing)} batches not done (first {missing[0]})")
    stats = _merged(store, batches)
    if int(stats.get("n", 0)) == 0:
        raise ValueError(query_batches.unlabelled_message(queries_path, qfiles))
    scores = _scores(stats, k_max)
    best = inprocess.best_on_eval_set(scores.acc)
    honest = batch_stats.honest_from(stats, seed)
    confident = _confidence_figures(store, [b for b in batches if b.kind == "q"], best, job)
    n = int(stats["n"])
    retrieval_s, scoring_s = float(stats.get("retrieval_s", 0.0)), float(stats.get("scoring_s", 0.0))
    timing = {"queries": n, "k_max": k_max, "probe_shards": probe_shards, "probe_margin": probe_margin,
              "filter": where.describe() if where is not None else None, "retrieval_s": retrieval_s,
              "scoring_all_rules_all_k_s": scoring_s, "scoring_over_retrieval": scoring_s / max(retrieval_s, 1e-12),
              "engine": "ray-data", "workers": used_workers, "wall_s": time.perf_counter() - t0}
    summary = inprocess.write_outputs(out_dir, memory_path, manifest.version, queries_path, timing, scores, best,
                                      honest, confident, reranked, ties)
    summary["batches"] = {"planned": len(batches), "reused": len(batches) - len(todo), "computed": len(todo)}
    return summary


def _absolute(path: str) -> str:
    """Local paths made absolute: Ray workers need not share the driver's working directory."""
    return path if storage.is_remote(path) else os.path.abspath(path)


def _identity(job: Job, qfiles, ofiles, rows: int) -> dict:
    """What the batches of a run depend on: a rerun must match it to reuse them."""
    return {"format": STATE_FORMAT, "memory": job.memory, "version": job.version, "k_max": job.k_max,
            "ties": job.ties, "seed": job.seed, "probe_shards": job.probe_shards,
            "probe_margin": job.probe_margin, "rows_per_batch": rows,
            "filter": job.where.to_json() if job.where is not None else None,
            "queries": [[f.path, f.rows, f.fingerprint] for f in qfiles],
            "ood": [[f.path, f.rows, f.fingerprint] for f in ofiles]}


@contextlib.contextmanager
def _ray_session(address: str | None):
    """Connected to Ray for the run: the cluster at ``address``, or a fresh local instance (disconnected
    after, if connected here). Ray prints cluster events on the driver's stdout, which carries vismem's
    JSON: while Ray is connected, stdout goes to stderr."""
    import ray

    with contextlib.redirect_stdout(sys.stderr):
        started = not ray.is_initialized()
        if started:
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                          runtime_env={"env_vars": env} if env else None)
            if address and address != "local":
                ray.init(address=address, **kwargs)
            else:  # a fresh instance, never an unrelated cluster that happens to run on this machine
                ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
        try:
            yield
        finally:
            if started:
                ray.shutdown()


@contextlib.contextmanager
def _driver_memory(job: Job, hosted: bool, needed: bool):
    """The memory as the driver holds it: proxies of Ray-hosted shards (handed to the workers), an
    in-process copy only for the re-ranker, or nothing."""
    if not needed:
        yield None
        return
    from memory.memory import Memory

    with Memory.open(job.memory, job.version, hosts="ray" if hosted else "local") as mem:
        yield mem


def _run_on_ray(job: Job, todo: list, store: BatchStore, workers: int | None, shards, progress: bool) -> int:
    """Run the batches ``todo`` through a Ray Data actor pool; returns the pool's size."""
    import ray
    import ray.data
    from tqdm import tqdm

    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # quiet: the bar says how far, errors come as rows
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = max(1, math.ceil(len(todo) / (TASKS_PER_WORKER * workers)))
    groups = query_batches.tasks(todo, per_task)
    workers = min(workers, len(groups))
    items = [{"task": json.dumps([dataclasses.asdict(b) for b in g])} for g in groups]
    # Ray-hosted shards hold the CPUs; the workers mostly wait on them, so they reserve none.
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        EvalWorker, fn_constructor_kwargs={"job": dataclasses.asdict(dataclasses.replace(job, where=None)),
                                           "where": job.where, "shards": shards}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=0 if shards is not None else 1)
    bar = tqdm(total=len(todo), desc="eval", unit="batch", disable=not progress or len(todo) <= 1)
    try:
        for row in ds.iter_rows():
            if row["error_type"]:
                raise _error(str(row["error_type"]), str(row["error"]))
            bar.update(int(row["batches"]))
    finally:
        bar.close()
    return workers


def _error(kind: str, message: str) -> Exception:
    """A worker's refused input or lost shard, as the exception it was."""
    from memory.ray_shards import ShardLost

    return {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "ShardLost": ShardLost}[kind](message)


def _first_labelled(batches: list, qfiles, n: int):
    """``(embeddings, labels, uris)`` of the first ``n`` labelled queries, read batch by batch (the re-ranker's)."""
    embs, truths, uris, have = [], [], [], 0
    for b in batches:
        columns = ("id", "embedding", "label") + (("uri",) if "uri" in qfiles[b.file_index].columns else ())
        for _, rows in query_batches.read_batches([b], columns):
            known = rows["labels"] >= 0
            embs.append(rows["embeddings"][known])
            truths.append(rows["labels"][known])
            uris.append(np.asarray(rows["uri"], dtype=object)[known] if "uri" in rows else np.full(known.sum(), ""))
            have += int(known.sum())
        if have >= n:
            break
    return np.concatenate(embs)[:n], np.concatenate(truths)[:n], np.concatenate(uris)[:n]


def _merged(store: BatchStore, batches: list) -> dict:
    """Every batch's statistics added up, one file at a time."""
    total = None
    for b in batches:
        total = batch_stats.merge(total, store.stats(b.key))
    return total or {}


def _scores(stats: dict, k_max: int) -> inprocess.Scores:
    """The in-process evaluation's :class:`eval.evaluate.Scores`, from merged statistics."""
    n = int(stats["n"])
    sweeps = batch_stats.sweeps_from(stats["correct"], n)
    acc = {m: sweeps[m][batch_stats.DEFAULTS[batch_stats.SWEEPS[m][0]] if batch_stats.SWEEPS[m][0] else None]
           for m in voting.METHODS}
    rel = stats["rank_correct"] / n
    cal = metrics.calibration_from_counts({"k": int(stats["cal_k"]), "top_n": stats["top_n"],
                                           "top_correct": stats["top_correct"], "certainty_n": stats["certainty_n"],
                                           "certainty_correct": stats["certainty_correct"]})
    dist_ood = None
    if "ood_n" in stats:
        dist_ood = metrics.mean_distance(stats["ood_dist_units"], stats["ood_dist_n"])
    return inprocess.Scores(acc=acc, sweeps=sweeps, hit=stats["hits"] / n, rel=rel, rel_fit=metrics.fit_log(rel),
                            cal=cal, dist_in=metrics.mean_distance(stats["dist_units"], stats["dist_n"]),
                            dist_ood=dist_ood, seconds=float(stats.get("scoring_s", 0.0)))


def _confidence_figures(store: BatchStore, batches: list, best: dict, job: Job) -> dict:
    """``eval.calibration.confidence_figures`` from the kept neighbour lists: one pass computes every rule's
    confidences at its best k (kept in a scratch folder), the exact coverage points take five more over them."""
    scratch = tempfile.mkdtemp(prefix=".confidence-", dir=store.dir)
    try:
        bins = {m: None for m in best}
        hist = {m: None for m in best}
        kept = []
        for b in batches:
            if not int(store.stats(b.key)["n"]):
                continue
            labels, sims, weights, truth = store.neighbours(b.key)
            for method, chosen in best.items():
                conf, correct = calibration.confidence_at_k(
                    labels, sims, truth, method=method, k=int(chosen["k"]), num_classes=job.num_classes,
                    weights=weights, ties=job.ties, **batch_stats.DEFAULTS)
                bins[method] = batch_stats.merge(bins[method], metrics.confidence_bins(conf, correct))
                h = metrics.coverage_histogram(conf, correct)
                hist[method] = h if hist[method] is None else (hist[method][0] + h[0], hist[method][1] + h[1])
                np.savez(os.path.join(scratch, f"{b.key}.{method}.npz"), conf=conf, correct=correct)
            kept.append(b.key)
        out = {}
        for method, chosen in best.items():
            def chunks(method=method):
                for key in kept:
                    with np.load(os.path.join(scratch, f"{key}.{method}.npz")) as z:
                        yield z["conf"], z["correct"]

            points = selection.coverage_points(chunks, calibration.COVERAGES)
            out[method] = calibration.figure(int(chosen["k"]), bins[method], hist[method], points)
        return out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

