"""``vismem eval``: one retrieval pass at k-max, then every figure from the same neighbour lists.

Figures (DESIGN.md): top-1 accuracy of every voting rule at every k, reported two ways — the best k
on the evaluation set itself (as the paper reports) and the honest figure, where k and the rule's
hyper-parameter (alpha, tau, xi) are chosen on a held-out half of the queries (a hash of each
query's id, ``eval.batch_stats.held_out_tune``) and applied to the other half; hit rate at k;
neighbour reliability with its ``a * ln(i) + b`` fit; calibration; each rule's confidence at its
best k: reliability diagram, ECE and risk-coverage (``eval.calibration``); distances to the first
100 neighbours (in- versus out-of-distribution when OOD queries are given); and hyper-parameter
sweeps. Output: ``metrics.jsonl``, ``report.md`` with tables, PNG plots.

:func:`evaluate` holds every query's neighbours in this process (queries x k-max labels,
similarities and weights) and computes each figure from those arrays: the in-process evaluation
(``vismem eval --in-process``) and the oracle of the streamed one (``eval.streamed``), which must
write the same report. Both search the same batches (``eval.query_batches``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time

import numpy as np

from eval import calibration, images, metrics, plots, query_batches
from eval.batch_stats import (CALIBRATION_K, DEFAULTS, DISTANCE_COLUMNS, SWEEPS, check_split, choose,  # noqa: F401
                              held_out_tune, honest_record, params)
from memory import manifest as mf
from memory import output_paths, schema, voting
from memory.memory import Memory
from memory.query import check_k, positive_ints, read_queries, search_batch

_TIE_WORDS = {"nearest": "the tied class whose best-ranked neighbour is nearest wins",
              "leader": "the tied class that reached the top score first keeps it (the released code's rule)"}


def retrieve(memory: Memory, embeddings: np.ndarray, k_max: int, bounds, probe_shards: int | None = None,
             where=None, probe_margin: float | None = None):
    """``(labels, sims, weights)`` of the k_max nearest neighbours of every query, one search per
    ``embeddings[a:b]`` of ``bounds`` (``probe_shards``, ``probe_margin``: routed search on a k-means memory; ``where``:
    only the items a ``memory.filters.ItemFilter`` allows)."""
    from tqdm import tqdm

    parts = []
    for a, b in tqdm(bounds, desc="retrieve", unit="batch", disable=len(bounds) <= 1):
        if b > a:
            nb = memory.search(embeddings[a:b], k_max, probe_shards=probe_shards, probe_margin=probe_margin,
                               where=where)
            parts.append((nb.labels, nb.sims, nb.weights))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def sweep_accuracy(labels, sims, truth, num_classes, weights=None, ties="nearest") -> dict:
    """``{method: {value: accuracy (K,)}}`` over each rule's hyper-parameter grid."""
    out = {}
    for method, (_, values) in SWEEPS.items():
        out[method] = {}
        for value in values:
            acc = metrics.accuracy_all_k(labels, sims, truth, num_classes=num_classes, methods=(method,),
                                         weights=weights, ties=ties, **params(method, value))[method]
            out[method][value] = acc
    return out


def honest_choice(labels, sims, truth, num_classes, *, tune, seed: int = 0, weights=None, ties="nearest") -> dict:
    """Choose (k, hyper-parameter) per rule on the queries of ``tune`` (``(Q,)`` bool, :func:`held_out_tune`
    of their ids and ``seed``); score the others."""
    tune = np.asarray(tune, dtype=bool)
    test = ~tune
    check_split(int(tune.sum()), int(test.sum()), seed)

    def rows(a, sel):
        return None if a is None else a[sel]

    tuned = sweep_accuracy(labels[tune], sims[tune], truth[tune], num_classes, rows(weights, tune), ties)
    out = {}
    for method, (value, k, tune_acc) in choose(tuned).items():
        acc = metrics.accuracy_all_k(labels[test], sims[test], truth[test], num_classes=num_classes, methods=(method,),
                                     weights=rows(weights, test), ties=ties, **params(method, value))[method]
        out[method] = honest_record(method, value, k, tune_acc, acc[k - 1], tune.sum(), test.sum())
    return out


def evaluate(memory_path: str, queries_path: str, out_dir: str, *, k_max: int = 100,
             ood_queries_path: str | None = None, batch_size: int = 4096, seed: int = 0,
             version: int | None = None, ray_address: str | None = None, reranker=None,
             rerank_k: int = 50, rerank_queries: int = 200, probe_shards: int | None = None,
             ties: str = "nearest", where=None, probe_margin: float | None = None) -> dict:
    """Evaluate a memory against labelled query embeddings in this process; write the report under ``out_dir``.

    ``where`` (``memory.filters.ItemFilter``) lets only the items it allows vote, e.g. the
    human-labelled ones of a memory that also holds pseudo-labels (the report names it).

    With a ``reranker`` (``eval.rerank.Reranker``), the first ``rerank_queries`` queries and their
    ``rerank_k`` neighbours (images resolved from the items' uris by :func:`memory.uris.resolve`)
    are also sent to it, and its accuracy is reported beside the voting rules, with rank voting as
    the fallback for answers that are not a class name.

    With ``ray_address`` (a cluster address, or ``local`` for a local instance) the memory's shards
    are hosted by Ray actors across the cluster and every query batch fans out to them.

    With ``probe_shards`` (a k-means memory) each query searches only its nearest shards, so the
    report shows what routing costs in accuracy; ``probe_margin`` visits the further ones only within
    that similarity margin of the nearest (``Memory.search``).

    ``ties`` settles a tied top score in every vote (``memory.voting.TIES``: ``nearest``, ours, or
    ``leader``, the released code's, to reproduce the paper's figures).
    """
    positive_ints(k_max=k_max, batch_size=batch_size, rerank_k=rerank_k, rerank_queries=rerank_queries)
    voting.check_ties(ties)
    output_paths.check_folder(out_dir, "--out")
    manifest = mf.read_manifest(memory_path, version)
    rows = search_batch(batch_size, k_max)
    q, truth, uris, ids, bounds = _labelled_queries(queries_path, manifest, memory_path, rows)
    check_k(k_max, manifest, memory_path, "k-max")
    ood = None
    if ood_queries_path:
        files = query_batches.describe(schema.shard_files(ood_queries_path))
        ood = (read_queries(ood_queries_path, manifest, memory_path, what="out-of-distribution queries",
                            check_labels=False)["embeddings"],
               query_batches.global_bounds(files, query_batches.plan(files, rows, "ood")))
    with _hosts(ray_address) as hosts, Memory.open(memory_path, manifest.version, hosts=hosts) as mem:
        got = _retrieve_all(mem, q, truth, bounds, k_max, (probe_shards, probe_margin), ood, where)
        reranked = None
        if reranker is not None:
            n = rerank_queries
            reranked = rerank(mem, memory_path, reranker, q[:n], truth[:n], uris[:n], min(rerank_k, k_max), ties)
    scores = score(got, truth, k_max, ties)
    best, honest = choose_k(got, scores.acc, truth, held_out_tune(ids, seed), seed, ties)
    confident = calibration.confidence_figures(got.labels, got.sims, truth, num_classes=got.num_classes, best=best,
                                               weights=got.weights, ties=ties, **DEFAULTS)
    timing = {"queries": int(len(truth)), "k_max": k_max, "probe_shards": probe_shards,
              "probe_margin": probe_margin, "filter": where.describe() if where is not None else None,
              "retrieval_s": got.seconds,
              "scoring_all_rules_all_k_s": scores.seconds, "scoring_over_retrieval": scores.seconds / got.seconds}
    return write_outputs(out_dir, memory_path, got.version, queries_path, timing, scores, best, honest, confident,
                         reranked, ties)


def write_outputs(out_dir: str, memory_path: str, version: int, queries_path: str, timing: dict, scores: "Scores",
                  best: dict, honest: dict, confident: dict, reranked, ties: str) -> dict:
    """Write ``metrics.jsonl``, the PNG plots and ``report.md`` under ``out_dir``; return the summary
    ``vismem eval`` prints."""
    os.makedirs(out_dir, exist_ok=True)  # only now: a run that fails leaves no folder behind
    _write_metrics(out_dir, _records(scores, best, honest, timing, reranked, ties) + calibration.records(confident))
    figures = plots.write_eval_plots(out_dir, acc=scores.acc, hit=scores.hit, rel=scores.rel,
                                     rel_fit=scores.rel_fit, cal=scores.cal, dist_in=scores.dist_in,
                                     dist_ood=scores.dist_ood, sweeps=scores.sweeps)
    figures += plots.write_confidence_plots(out_dir, confident)
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write(_report(memory_path, version, queries_path, timing, best, honest, scores, figures, reranked,
                        ties, calibration.report_lines(confident)))
    return {"report": report, "best_k_on_eval_set": best,
            "held_out_choice": {m: {"k": v["k"], v["param"] or "param": v["value"],
                                    "test_accuracy": v["test_accuracy"]} for m, v in honest.items()},
            "confidence": calibration.summary(confident), "ties": ties, "timing": timing}


@dataclasses.dataclass
class Retrieval:
    """One retrieval pass at k-max: every query's neighbours, and the memory facts scoring needs."""

    labels: np.ndarray
    sims: np.ndarray
    weights: np.ndarray | None
    ood_sims: np.ndarray | None
    seconds: float
    num_classes: int
    version: int


@dataclasses.dataclass
class Scores:
    """Every figure derived from one retrieval pass (``seconds``: scoring every rule at every k)."""

    acc: dict
    sweeps: dict
    hit: np.ndarray
    rel: np.ndarray
    rel_fit: tuple
    cal: dict
    dist_in: np.ndarray
    dist_ood: np.ndarray | None
    seconds: float


def _labelled_queries(queries_path: str, manifest, memory_path: str, rows: int):
    """``(embeddings, labels, uris, ids, bounds)`` of the labelled rows of the query set, checked against
    the memory (``memory.query.read_queries``: encoder, dimension, labels within its classes);
    ``bounds``: each search batch (``eval.query_batches``) as a range of those rows."""
    files = query_batches.describe(schema.shard_files(queries_path))
    queries = read_queries(queries_path, manifest, memory_path)
    known = queries["labels"] >= 0
    if not known.any():
        raise ValueError(query_batches.unlabelled_message(queries_path, files))
    before = np.concatenate([[0], np.cumsum(known)])  # labelled rows before each row
    bounds = [(int(before[a]), int(before[b]))
              for a, b in query_batches.global_bounds(files, query_batches.plan(files, rows))]
    return (queries["embeddings"][known], queries["labels"][known], queries["provenance"]["uri"][known],
            queries["ids"][known], bounds)


@contextlib.contextmanager
def _hosts(ray_address: str | None):
    """``ray`` while connected to the cluster (disconnected after, if connected here), else ``local``.

    Ray prints cluster events (a node marked dead, a task retried) on the driver's stdout, which
    carries vismem's JSON: while Ray is connected, stdout goes to stderr.
    """
    if not ray_address:
        yield "local"
        return
    import ray

    with contextlib.redirect_stdout(sys.stderr):
        started = not ray.is_initialized()
        if started:
            ray.init(address=None if ray_address == "local" else ray_address, log_to_driver=False)
        try:
            yield "ray"
        finally:
            if started:
                ray.shutdown()


def _retrieve_all(mem: Memory, q, truth, bounds, k_max: int, routing, ood, where=None) -> Retrieval:
    """The retrieval stage: the queries' neighbours at k-max, and the OOD queries' (``ood``: embeddings and
    batch bounds) similarities. ``routing``: ``(probe_shards, probe_margin)``."""
    probe_shards, probe_margin = routing
    if k_max > len(mem):
        raise ValueError(f"k-max {k_max} exceeds the memory's {len(mem)} items")
    if truth.max() >= mem.num_classes:
        raise ValueError(f"query labels reach {truth.max()}, but the memory has {mem.num_classes} classes")
    t0 = time.perf_counter()
    labels, sims, weights = retrieve(mem, q, k_max, bounds, probe_shards, where, probe_margin)
    seconds = time.perf_counter() - t0
    ood_sims = retrieve(mem, ood[0], k_max, ood[1], probe_shards, where, probe_margin)[1] if ood is not None else None
    return Retrieval(labels, sims, weights, ood_sims, seconds, mem.num_classes, mem.version)


def score(got: Retrieval, truth, k_max: int, ties: str = "nearest") -> Scores:
    """The scoring stage: accuracy of every rule at every k, sweeps, hit rate, reliability, calibration."""
    labels, sims, weights, num_classes = got.labels, got.sims, got.weights, got.num_classes
    t0 = time.perf_counter()
    acc = metrics.accuracy_all_k(labels, sims, truth, num_classes=num_classes, weights=weights, ties=ties)
    seconds = time.perf_counter() - t0
    rel = metrics.neighbour_reliability(labels, truth)
    return Scores(
        acc=acc, sweeps=sweep_accuracy(labels, sims, truth, num_classes, weights, ties),
        hit=metrics.hit_rate(labels, truth), rel=rel, rel_fit=metrics.fit_log(rel),
        cal=metrics.calibration(labels, truth, num_classes=num_classes, k=min(CALIBRATION_K, k_max), ties=ties),
        dist_in=metrics.mean_distance(*metrics.distance_sums(sims, DISTANCE_COLUMNS)),
        dist_ood=None if got.ood_sims is None else metrics.mean_distance(
            *metrics.distance_sums(got.ood_sims, DISTANCE_COLUMNS)),
        seconds=seconds)


def best_on_eval_set(acc: dict) -> dict:
    """``{method: {"k", "accuracy"}}``: the k where each rule is most accurate on the evaluation set itself."""
    return {m: {"k": int(a.argmax()) + 1, "accuracy": float(a.max())} for m, a in acc.items()}


def choose_k(got: Retrieval, acc: dict, truth, tune, seed: int, ties: str = "nearest") -> tuple[dict, dict]:
    """The choice stage: ``(best k on the evaluation set itself, held-out choice)`` per rule."""
    return best_on_eval_set(acc), honest_choice(got.labels, got.sims, truth, got.num_classes, tune=tune, seed=seed,
                                                weights=got.weights, ties=ties)


def _records(s: Scores, best, honest, timing, reranked, ties) -> list:
    """The rows of ``metrics.jsonl``, one per figure point."""
    records = [{"figure": "voting", "ties": ties}]
    records += [{"figure": "accuracy_by_k", "method": m, "k": k + 1, "accuracy": float(a[k])}
                for m, a in s.acc.items() for k in range(len(a))]
    records += [{"figure": "best_k_on_eval_set", "method": m, **v} for m, v in best.items()]
    records += [{"figure": "held_out_choice", "method": m, **v} for m, v in honest.items()]
    records += [{"figure": "hit_rate", "k": k + 1, "value": float(v)} for k, v in enumerate(s.hit)]
    records += [{"figure": "neighbour_reliability", "index": i + 1, "accuracy": float(v)} for i, v in enumerate(s.rel)]
    records.append({"figure": "neighbour_reliability_fit", "a": s.rel_fit[0], "b": s.rel_fit[1]})
    records += [{"figure": "calibration_count", "count": c, "accuracy": a, "n": n}
                for c, (a, n) in s.cal["count"].items()]
    records += [{"figure": "calibration_count_binned", "count_from": lo, "count_to": hi, "accuracy": a, "n": n}
                for lo, hi, a, n in s.cal["count_bins"]]
    records += [{"figure": "distance_by_neighbour", "index": i + 1, "in_distribution": float(d),
                 "out_of_distribution": None if s.dist_ood is None else float(s.dist_ood[i])}
                for i, d in enumerate(s.dist_in)]
    records += [{"figure": "sweep", "method": m, "value": v, "best_k": int(a.argmax()) + 1, "best": float(a.max())}
                for m, by in s.sweeps.items() for v, a in by.items()]
    records.append({"figure": "timing", **timing})
    if reranked is not None:
        records.append({"figure": "rerank", **reranked})
    return records


def _write_metrics(out_dir: str, records: list) -> None:
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r, default=float) + "\n")


def rerank(mem, memory_path, reranker, q, truth, uris, k, ties="nearest") -> dict:
    """Send each query and its k labelled neighbours to the re-ranker; score it beside rank voting."""
    from eval.rerank import Neighbour, rerank_accuracy

    image = images.image_bytes  # resolves every source kind's uri (memory.uris)
    res = mem.classify(q, k, "rank", ties=ties)
    where = images.item_uris(memory_path, mem.version)
    names = mem.class_names
    neighbour_lists = [
        [Neighbour(image(where.get(i, "")), names[lab], float(s)) for i, lab, s in zip(ids, labs, sims) if lab >= 0]
        for ids, labs, sims in zip(res.neighbours.ids, res.neighbours.labels, res.neighbours.sims)
    ]
    out = rerank_accuracy(reranker, [image(str(u)) for u in uris], neighbour_lists, truth, res.predictions, names)
    return {**out, "k": k, "fallback": "rank"}


def _report(memory_path, version, queries_path, timing, best, honest, s: Scores, figures, reranked, ties,
            confidence_section: list) -> str:
    """``report.md``: the tables of the figures, and the plots."""
    hit, rel_fit, cal = s.hit, s.rel_fit, s.cal
    lines = [
        "# Evaluation report", "",
        f"Memory `{memory_path}` (version {version}); queries `{queries_path}` ({timing['queries']} labelled); "
        f"k-max {timing['k_max']}"
        + (f"; each query searched only its {timing['probe_shards']} nearest shards (k-means routing)"
           if timing.get("probe_shards") else "")
        + (f"; a further shard only within similarity {timing['probe_margin']:g} of the nearest (probe margin)"
           if timing.get("probe_margin") is not None else "")
        + (f"; only items with {timing['filter']} vote" if timing.get("filter") else "") + ".", "",
        f"Ties between classes: {_TIE_WORDS[ties]} (`--ties {ties}`).", "",
        f"Retrieval {timing['retrieval_s']:.2f} s; scoring every rule at every k "
        f"{timing['scoring_all_rules_all_k_s']:.2f} s ({100 * timing['scoring_over_retrieval']:.1f}% of retrieval).", "",
        "## Top-1 accuracy by voting rule", "",
        "**Honest figure**: k and the rule's hyper-parameter chosen on a random half of the queries, "
        "accuracy measured on the other half.", "",
        "| rule | chosen k | parameter | tune accuracy | **test accuracy** |", "| --- | --- | --- | --- | --- |",
    ]
    for m, v in honest.items():
        param = f"{v['param']} = {v['value']}" if v["param"] else "-"
        lines.append(f"| {m} | {v['k']} | {param} | {v['tune_accuracy']:.4f} | **{v['test_accuracy']:.4f}** |")
    lines += ["", "For comparison with the paper (optimistic: k chosen on the evaluation set itself, "
              "default hyper-parameters):", "", "| rule | best k | accuracy |", "| --- | --- | --- |"]
    lines += [f"| {m} | {v['k']} | {v['accuracy']:.4f} |" for m, v in best.items()]
    if reranked is not None:
        lines += ["", f"**Re-ranked** by a vision-language model (the Gemini experiment) on the first "
                  f"{reranked['queries']} queries with their {reranked['k']} nearest neighbours: accuracy "
                  f"{reranked['accuracy']:.4f} against {reranked['fallback_accuracy']:.4f} for rank voting on the "
                  f"same queries ({reranked['invalid_answers']} answers were not a class name and fell back to "
                  "rank voting)."]
    ks = [k for k in (1, 5, 10, 50, 100) if k <= len(hit)]
    lines += ["", "## Hit rate at k (Appendix D)", "", "| k | " + " | ".join(map(str, ks)) + " |",
              "| --- |" + " --- |" * len(ks), "| hit rate | " + " | ".join(f"{hit[k - 1]:.4f}" for k in ks) + " |",
              "", "## Neighbour reliability (Figure 1)", "",
              f"Accuracy of the i-th neighbour alone fits `acc = {rel_fit[0]:.4f} * ln(i) + {rel_fit[1]:.4f}`.",
              "", "## Calibration (Appendix I)", "",
              f"Accuracy of plurality voting against how many of the first {min(100, len(hit))} neighbours carry "
              "its class (counts in at most 10 ranges; each count in `metrics.jsonl`):", "",
              "| plurality count among neighbours | accuracy | queries |", "| --- | --- | --- |"]
    lines += [f"| {lo if lo == hi else f'{lo}-{hi}'} | {a:.4f} | {n} |" for lo, hi, a, n in cal["count_bins"]]
    lines += [""] + confidence_section
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in figures] + [""]
    return "\n".join(lines)
