"""``vismem eval`` and ``vismem experiment``: a memory's figures, and the paper's capability experiments."""
from __future__ import annotations

import argparse
import os
import textwrap

from cli.common import (CLASS_NAMES_HELP, add_filters, add_ties, class_names, comma_names, count, fraction,
                        int_list, item_filter, non_negative, non_negative_int, output_folder)

EXPERIMENT_EPILOG = """examples:
  vismem experiment scaling  train-emb/ test-emb/ --out report/ --class-names summary.json
  vismem experiment scaling  lite0-train/ lite0-test/ --label lite0 --out report/ \
      --compare lite2=lite2-train/,lite2-test/
  vismem experiment pruning  train-emb/ test-emb/ --out report/ --k 10 --self-k 10
  vismem experiment unlearning train-emb/ test-emb/ --out report/ --forget-fraction 0.05
  vismem experiment new-classes train-emb/ test-emb/ --out report/ --new Sandal,Bag \\
      --extra-memory mnist-train/ --extra-queries mnist-test/ --extra-names 0,1,2,3,4,5,6,7,8,9
  vismem experiment granularity train-emb/ test-emb/ --out report/ --tree eval/trees/fashion_mnist.json \\
      --held-out Sneaker
Inputs are embedding shards (a file, a directory of shards, or a glob; local or gs://). Each command
writes NAME.json and report-NAME.md under --out and rebuilds experiments.md from every part there."""


EVAL_DESCRIPTION = "\n\n".join(textwrap.fill(p, 100) for p in (
    "One retrieval pass at --k-max through the fan-out layer, then every figure from the same neighbour lists: "
    "top-1 accuracy of every voting rule at every k (best k on the evaluation set, and the honest figure with k "
    "and alpha/tau/xi chosen on a held-out half of the queries, a hash of each query's id), hit rate, neighbour "
    "reliability with its log fit, calibration, each rule's confidence at its best k (reliability diagram with "
    "its expected calibration error, risk-coverage with the accuracy at 90% coverage), distances to the first 100 "
    "neighbours (in- vs out-of-distribution with --ood) and hyper-parameter sweeps. Writes metrics.jsonl, PNG "
    "plots and report.md under --out.",
    "The queries are streamed: Ray Data (a local instance, or the cluster of --ray-address) reads them batch by "
    "batch, a pool of workers searches and scores each batch, and the figures are added up from per-batch counts "
    "kept under OUT/batches, so memory does not grow with the number of queries, and a killed run, rerun, reuses "
    "every batch it finished. --in-process holds every query's neighbours in this process instead: the same "
    "report, to the last digit."))


def _run_eval(a) -> dict:
    from eval.rerank import HttpVisionLanguageReranker

    reranker = None
    if a.rerank_endpoint:
        if not a.rerank_model:
            raise ValueError("--rerank-endpoint needs --rerank-model")
        reranker = HttpVisionLanguageReranker(a.rerank_endpoint, a.rerank_model)
    kw = dict(k_max=a.k_max, ood_queries_path=a.ood, batch_size=a.batch_size, seed=a.seed, version=a.version,
              ray_address=a.ray_address, reranker=reranker, rerank_k=a.rerank_k, rerank_queries=a.rerank_queries,
              probe_shards=a.probe_shards, probe_margin=a.probe_margin, ties=a.ties, where=item_filter(a))
    if a.in_process:
        if a.workers is not None:
            raise ValueError("--workers sizes the streamed job's worker pool; --in-process runs in this process alone")
        from eval.evaluate import evaluate

        return evaluate(a.memory, a.queries, a.out, **kw)
    from eval.streamed import evaluate_streamed

    return evaluate_streamed(a.memory, a.queries, a.out, workers=a.workers, progress=not a.no_progress, **kw)


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a memory against labelled query embeddings",
        description=EVAL_DESCRIPTION,
        epilog="examples:\n  vismem eval /data/fmnist-memory test-emb/ --out eval-out --k-max 100\n"
        "  vismem eval gs://bucket/memory 'gs://bucket/test-emb/*.parquet' --out eval-out --workers 8\n"
        "  vismem eval /data/fmnist-memory test.parquet --out eval-out --in-process",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("memory", help="memory directory or gs:// URL")
    p.add_argument("queries", help="embedding shards of labelled query embeddings: a Parquet file, a folder of "
                   "them or a glob, local or gs://")
    p.add_argument("--out", required=True,
                   help="output folder for report.md, metrics.jsonl and plots (written when the run succeeds); a "
                   "streamed run keeps its per-batch state under OUT/batches, which a rerun with the same inputs "
                   "reuses")
    p.add_argument("--k-max", type=count, default=100,
                   help="neighbours retrieved once per query (default 100; at most the memory's live items)")
    p.add_argument("--ood", default=None, help="embedding shards of out-of-distribution queries (distances plot)")
    p.add_argument("--batch-size", type=count, default=4096,
                   help="queries per search batch: rows of one shard at a time (default 4096)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the held-out split")
    p.add_argument("--version", type=count, default=None, help="memory version to pin (default latest)")
    p.add_argument("--rerank-endpoint", default=None,
                   help="chat-completions URL of a vision-language model to re-rank neighbours (key from "
                   "$VISMEM_RERANK_API_KEY)")
    p.add_argument("--rerank-model", default=None, help="model name sent to the re-ranker")
    p.add_argument("--rerank-k", type=count, default=50, help="neighbours shown to the re-ranker")
    p.add_argument("--rerank-queries", type=count, default=200, help="queries sent to the re-ranker")
    p.add_argument("--probe-shards", type=count, default=None,
                   help="k-means memories: search each query only in its P nearest shards (default: all)")
    p.add_argument("--probe-margin", type=non_negative, default=None, metavar="M",
                   help="k-means memories: visit a query's 2nd..P-th nearest shards (every shard without "
                   "--probe-shards) only where its similarity to them is within M of its nearest shard's")
    add_ties(p)
    add_filters(p)
    p.add_argument("--ray-address", default=None,
                   help="host the shards in Ray actors on this cluster (e.g. ray://head:10001, or 'local'); the "
                   "streamed job runs there too (default: a local Ray instance, each worker opening the memory)")
    p.add_argument("--workers", type=count, default=None,
                   help="streamed job: workers searching and scoring batches (default: the cluster's CPUs; each "
                   "opens the memory, unless the shards are hosted with --ray-address)")
    p.add_argument("--in-process", action="store_true",
                   help="hold every query's neighbours in this process and compute the figures from them (the "
                   "streamed job's oracle; memory grows with the number of queries)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _scaling(a, memory, queries, names) -> dict:
    from eval.experiments import common, scaling

    result = scaling.run(memory, queries, names, k=a.k, method=a.method, label=a.label, ties=a.ties)
    if a.compare:
        series = {a.label: (memory, queries, None)}
        for spec in a.compare:
            label, sep, paths = spec.partition("=")
            if not sep or paths.count(",") != 1:
                raise ValueError(f"--compare takes LABEL=MEMORY,QUERIES, got {spec!r}")
            mem_path, q_path = paths.split(",")
            _check_same_encoder(mem_path, q_path)
            series[label] = (common.read_split(mem_path), common.read_split(q_path), None)
        common.write_part(a.out, "scaling-encoders",
                          scaling.compare_encoders(series, names, k=a.k, method=a.method, ties=a.ties))
    return result


def _pruning(a, memory, queries, names) -> dict:
    from eval.experiments import pruning

    return pruning.run(memory, queries, names, k=a.k, self_k=a.self_k, hard_thresholds=a.thresholds, ties=a.ties)


def _new_classes(a, memory, queries, names) -> dict:
    from eval.experiments import common, new_classes

    extra = None
    if a.extra_memory or a.extra_queries:
        if not (a.extra_memory and a.extra_queries and a.extra_names):
            raise ValueError("--extra-memory, --extra-queries and --extra-names go together")
        extra = (common.read_split(a.extra_memory), common.read_split(a.extra_queries),
                 comma_names(a.extra_names, "--extra-names"))
    new = _names_in(names, comma_names(a.new, "--new"), "--new")
    return new_classes.run(memory, queries, names, new, k=a.k, extra=extra, ties=a.ties)


def _granularity(a, memory, queries, names) -> dict:
    from eval import hierarchy
    from eval.experiments import granularity

    _names_in(names, [a.held_out], "--held-out")
    if not os.path.isfile(a.tree):
        raise ValueError(f"--tree: no such file: {a.tree} (a class tree JSON, e.g. eval/trees/fashion_mnist.json)")
    tree = hierarchy.load_tree(a.tree, names)
    return granularity.run(memory, queries, names, tree, a.held_out,
                           exemplars=a.exemplars, max_queries=a.max_queries)


def _unlearning(a, memory, queries, names) -> dict:
    from eval.experiments import unlearning

    if not 0 < a.forget_fraction < 1:
        raise ValueError(f"--forget-fraction must be between 0 and 1 (exclusive), got {a.forget_fraction}")
    return unlearning.run(memory, queries, names, forget_fraction=a.forget_fraction, k=a.k,
                          num_shards=a.num_shards, ties=a.ties)


def _labelled(split, path: str, what: str):
    if len(split) == 0:
        raise ValueError(f"the {what} at {path} hold no labelled rows (label >= 0)")
    return split


def _check_same_encoder(memory: str, queries: str) -> None:
    """Memory and query shards of one experiment must come from one encoder (memory.encoder_spec)."""
    from memory.query import shards_encoder

    m, q = shards_encoder(memory), shards_encoder(queries)
    if m is not None and q is not None and m.differences(q):
        raise ValueError(f"the memory shards {memory} and the queries {queries} come from different encoders: "
                         f"encoders differ in {', '.join(m.differences(q))}: {m.describe()} vs {q.describe()}")


def _names_in(names: list, wanted: list, option: str) -> list:
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"{option} names {', '.join(map(repr, unknown))}, not among the classes "
                         f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
    return wanted


EXPERIMENTS = {"scaling": _scaling, "pruning": _pruning, "new-classes": _new_classes,
               "granularity": _granularity, "unlearning": _unlearning}


def _run_experiment(a) -> dict:
    from eval.experiments import common

    output_folder(a.out, "--out")
    names = class_names(a.class_names)
    _check_same_encoder(a.memory, a.queries)
    memory = _labelled(common.read_split(a.memory), a.memory, "memory")
    queries = _labelled(common.read_split(a.queries), a.queries, "queries")
    top = int(max(memory.labels.max(), queries.labels.max()))
    if names is None:
        names = [str(i) for i in range(top + 1)]
    elif top >= len(names):
        raise ValueError(f"labels reach {top}, but --class-names names {len(names)} classes")
    result = EXPERIMENTS[a.experiment](a, memory, queries, names)
    path = common.write_part(a.out, a.experiment, result)
    return {"experiment": a.experiment, "report": path}


def _common(p, *, votes: bool = True) -> None:
    p.add_argument("memory", help="embedding shards of the memory items (labelled)")
    p.add_argument("queries", help="embedding shards of labelled queries")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--class-names", default=None,
                   help=CLASS_NAMES_HELP + " (default 0..C-1)")
    p.add_argument("--k", type=count, default=10, help="neighbours that vote (default 10)")
    if votes:  # granularity places queries by a KS test, not by a vote
        add_ties(p)


def add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="run one of the paper's capability experiments",
                       description="Run a capability experiment of the paper on embedding shards and write its "
                       "part of the report.", epilog=EXPERIMENT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    exp = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    _add_scaling(exp)
    pr = exp.add_parser("pruning", help="hard and soft memory pruning for every voting rule")
    _common(pr)
    pr.add_argument("--self-k", type=count, default=10, help="neighbours per self-query that count")
    pr.add_argument("--thresholds", type=int_list, default=[2, 4, 8, 16], help="hard-pruning thresholds on v "
                    "(comma list, default 2,4,8,16)")
    nc = exp.add_parser("new-classes", help="accuracy on old classes before and after inserting new ones")
    _common(nc)
    nc.add_argument("--new", required=True, help="comma list of classes held out, then inserted")
    nc.add_argument("--extra-memory", default=None, help="memory shards of classes from another dataset")
    nc.add_argument("--extra-queries", default=None, help="query shards of those classes")
    nc.add_argument("--extra-names", default=None, help="their class names (comma list)")
    _add_granularity(exp)
    u = exp.add_parser("unlearning", help="remove a forget set; check it is never retrieved again")
    _common(u)
    u.add_argument("--forget-fraction", type=fraction, default=0.05, help="share of memory items forgotten")
    u.add_argument("--num-shards", type=count, default=4)
    p.set_defaults(func=_run_experiment)


def _add_scaling(exp) -> None:
    s = exp.add_parser("scaling", help="error against memory size, and the Appendix E fit")
    _common(s)
    s.add_argument("--method", default="rank")
    s.add_argument("--label", default="encoder", help="name of this series in the report (e.g. the encoder)")
    s.add_argument("--compare", action="append", default=[], metavar="LABEL=MEMORY,QUERIES",
                   help="the same images embedded by another encoder (repeatable): adds the by-encoder table, "
                        "plot and compute-memory trade-off")


def _add_granularity(exp) -> None:
    g = exp.add_parser("granularity", help="a newly discovered class placed in a class tree (Algorithm 1)")
    _common(g, votes=False)
    g.add_argument("--tree", required=True, help="class tree JSON (see eval/trees/fashion_mnist.json)")
    g.add_argument("--held-out", required=True, help="the newly discovered class")
    g.add_argument("--exemplars", type=int_list, default=[0, 1, 2, 5, 10, 20, 50],
                   help="exemplars of the new class inserted, per step (comma list)")
    g.add_argument("--max-queries", type=count, default=100)
