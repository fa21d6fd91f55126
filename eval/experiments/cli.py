"""``vismem experiment NAME``: the paper's capability experiments, each writing its part of the report."""
from __future__ import annotations

import argparse

EPILOG = """examples:
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


def _common(p):
    p.add_argument("memory", help="embedding shards of the memory items (labelled)")
    p.add_argument("queries", help="embedding shards of labelled queries")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--class-names", default=None,
                   help="comma list, or a JSON file (list, or the embed run summary); default 0..C-1")
    p.add_argument("--k", type=int, default=10, help="neighbours that vote (default 10)")


def add_parsers(sub) -> None:
    p = sub.add_parser("experiment", help="run one of the paper's capability experiments",
                       description="Run a capability experiment of the paper on embedding shards and write its "
                       "part of the report.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    exp = p.add_subparsers(dest="experiment", required=True, metavar="NAME")
    s = exp.add_parser("scaling", help="error against memory size, and the Appendix E fit")
    _common(s)
    s.add_argument("--method", default="rank")
    s.add_argument("--label", default="encoder", help="name of this series in the report (e.g. the encoder)")
    s.add_argument("--compare", action="append", default=[], metavar="LABEL=MEMORY,QUERIES",
                   help="the same images embedded by another encoder (repeatable): adds the by-encoder table, "
                        "plot and compute-memory trade-off")
    pr = exp.add_parser("pruning", help="hard and soft memory pruning for every voting rule")
    _common(pr)
    pr.add_argument("--self-k", type=int, default=10, help="neighbours per self-query that count")
    pr.add_argument("--thresholds", default="2,4,8,16", help="hard-pruning thresholds on v")
    nc = exp.add_parser("new-classes", help="accuracy on old classes before and after inserting new ones")
    _common(nc)
    nc.add_argument("--new", required=True, help="comma list of classes held out, then inserted")
    nc.add_argument("--extra-memory", default=None, help="memory shards of classes from another dataset")
    nc.add_argument("--extra-queries", default=None, help="query shards of those classes")
    nc.add_argument("--extra-names", default=None, help="their class names (comma list)")
    g = exp.add_parser("granularity", help="a newly discovered class placed in a class tree (Algorithm 1)")
    _common(g)
    g.add_argument("--tree", required=True, help="class tree JSON (see eval/trees/fashion_mnist.json)")
    g.add_argument("--held-out", required=True, help="the newly discovered class")
    g.add_argument("--exemplars", default="0,1,2,5,10,20,50")
    g.add_argument("--max-queries", type=int, default=100)
    u = exp.add_parser("unlearning", help="remove a forget set; check it is never retrieved again")
    _common(u)
    u.add_argument("--forget-fraction", type=float, default=0.05)
    u.add_argument("--num-shards", type=int, default=4)
    p.set_defaults(func=run)


def run(a) -> dict:
    from eval import hierarchy
    from eval.experiments import common, granularity, new_classes, pruning, scaling, unlearning

    memory = common.read_split(a.memory)
    queries = common.read_split(a.queries)
    names = common.class_names_arg(a.class_names, int(max(memory.labels.max(), queries.labels.max())) + 1)
    if a.experiment == "scaling":
        result = scaling.run(memory, queries, names, k=a.k, method=a.method, label=a.label)
        if a.compare:
            series = {a.label: (memory, queries, None)}
            for spec in a.compare:
                label, sep, paths = spec.partition("=")
                if not sep or paths.count(",") != 1:
                    raise ValueError(f"--compare takes LABEL=MEMORY,QUERIES, got {spec!r}")
                mem_path, q_path = paths.split(",")
                series[label] = (common.read_split(mem_path), common.read_split(q_path), None)
            common.write_part(a.out, "scaling-encoders",
                              scaling.compare_encoders(series, names, k=a.k, method=a.method))
    elif a.experiment == "pruning":
        result = pruning.run(memory, queries, names, k=a.k, self_k=a.self_k,
                             hard_thresholds=[int(t) for t in a.thresholds.split(",")])
    elif a.experiment == "new-classes":
        extra = None
        if a.extra_memory or a.extra_queries:
            if not (a.extra_memory and a.extra_queries and a.extra_names):
                raise ValueError("--extra-memory, --extra-queries and --extra-names go together")
            extra = (common.read_split(a.extra_memory), common.read_split(a.extra_queries),
                     a.extra_names.split(","))
        result = new_classes.run(memory, queries, names, a.new.split(","), k=a.k, extra=extra)
    elif a.experiment == "granularity":
        tree = hierarchy.load_tree(a.tree, names)
        result = granularity.run(memory, queries, names, tree, a.held_out,
                                 exemplars=[int(e) for e in a.exemplars.split(",")], max_queries=a.max_queries)
    elif a.experiment == "unlearning":
        result = unlearning.run(memory, queries, names, forget_fraction=a.forget_fraction, k=a.k,
                                num_shards=a.num_shards)
    else:
        raise ValueError(f"unknown experiment {a.experiment!r}")
    path = common.write_part(a.out, a.experiment, result)
    return {"experiment": a.experiment, "report": path}
