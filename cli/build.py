"""``vismem build``, ``add`` and ``compact``: the verbs that run a Beam job over a memory's shards."""
from __future__ import annotations

import argparse

from cli import terminal
from cli.common import CLASS_NAMES_HELP, class_names, count, finite, non_negative_int, output_folder
from pipelines.build_config import TARGET_SHARD_ITEMS

BEAM_HELP = (
    "Beam options go after the verb's own (or after --), each checked against Beam's option list before "
    "anything runs, so a typo is an error, e.g. --runner DirectRunner --direct_num_workers 2 "
    "--direct_running_mode multi_processing (the default: one process per core). Dataflow: --runner "
    "DataflowRunner --project P --region R --temp_location gs://B/tmp --requirements_file req.txt (or "
    "--sdk_container_image with vismem installed). Flink: --runner FlinkRunner --flink_master HOST:8081 "
    "--environment_type LOOPBACK. Spark: --runner SparkRunner --spark_master_url spark://HOST:7077."
)


def _scann_overrides(a) -> dict:
    brute = {"auto": None, "yes": True, "no": False}[a.scann_brute_force]
    return {k: v for k, v in {
        "brute_force": brute, "num_leaves": a.scann_num_leaves, "num_leaves_to_search": a.scann_leaves_to_search,
        "reorder": a.scann_reorder, "training_sample_size": a.scann_training_sample_size,
        "dimensions_per_block": a.scann_dims_per_block,
        "anisotropic_quantization_threshold": a.scann_aq_threshold}.items() if v is not None}


def _target_recall(text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a recall in (0, 1] or 'off', got {text!r}")
    return value


def _norm_tolerance(v: float) -> float | None:
    return None if v < 0 else v


def _run_build(a) -> dict:
    from pipelines.build import build_memory

    term = terminal.current()
    output_folder(a.out, "the memory folder")
    term.output_folder(a.out)
    result = build_memory(a.embeddings, a.out, num_shards=a.num_shards, class_names=class_names(a.class_names),
                          partition=a.partition, backend=a.backend, backend_params=_scann_overrides(a),
                          storage=a.storage, target_recall=a.target_recall, tuning_queries=a.tuning_queries,
                          norm_tolerance=_norm_tolerance(a.norm_tolerance),
                          dim=a.dim, kmeans_sample=a.kmeans_sample, kmeans_cells=a.kmeans_cells, seed=a.seed,
                          pipeline_args=a.beam_args, progress=term)
    _report(term, result, "built")
    return result


def _run_add(a) -> dict:
    from pipelines.build import add_to_memory

    term = terminal.current()
    term.output_folder(a.memory)
    result = add_to_memory(a.memory, a.embeddings, class_names=class_names(a.class_names), readmit=a.readmit,
                           norm_tolerance=_norm_tolerance(a.norm_tolerance), pipeline_args=a.beam_args,
                           progress=term)
    _report(term, result, "added to")
    return result


def _report(term, result: dict, done: str) -> None:
    """The closing line of a build or add, and a warning line for rows that went to the dead letter."""
    from pipelines.build_publish import rejected

    dead = result.get("dead_letter") or {}
    if not result.get("changed", True):
        term.summary(f"nothing added to {result['memory']} (version {result['version']} is current): "
                     f"{rejected(dead)}")
        return
    if dead.get("count"):
        term.warn(rejected(dead))
    shards = result.get("shards") or []
    term.summary(f"{done} {result['memory']} version {result['version']}: {result['items_added']:,} items in "
                 f"{len(shards)} shard{'s' * (len(shards) != 1)} ({result['items_total']:,} in all), "
                 f"{result['bytes_per_item']} bytes per item, {result['wall_seconds']:.1f} s")


def _run_compact(a) -> dict:
    from pipelines.compact import compact_memory

    term = terminal.current()
    term.output_folder(a.memory)
    result = compact_memory(a.memory, merge=not a.no_merge, pipeline_args=a.beam_args, progress=term)
    if result["changed"]:
        term.summary(f"compacted {a.memory} to version {result['version']}: {result['partitions_rewritten']} "
                     f"partitions rewritten, {result['items_dropped']:,} removed items dropped, "
                     f"{result['items']:,} items in {result['shards']} shards, {result['wall_seconds']:.1f} s")
    else:
        term.summary(f"nothing to compact in {a.memory} (version {result['version']})")
    return result


def add_build(sub) -> None:
    b = sub.add_parser(
        "build", beam_options=True, help="build a new memory from embedding shards (Beam)",
        description="Read embedding shards (Parquet, DESIGN.md schema), validate every row (dimension, NaN/inf, "
        "norm, duplicate ids, labels outside the class list; bad rows go to OUT/deadletter/*.parquet with a "
        "reason), assign rows to shards by id hash or k-means, build each shard's index in one worker and "
        "publish version 1 only after every shard succeeded. Prints a JSON summary: per-shard sizes and "
        "build times, dead-letter counts, bytes per item. " + BEAM_HELP,
        epilog="example: vismem build out/fm-train/embeddings /data/fmnist-memory (shards of 'vismem embed': "
        "their class names, a shard per 150,000 items). example: vismem build 'emb/*.parquet' /data/fmnist-memory "
        "--num-shards 8 --class-names classes.txt --partition kmeans --backend scann --runner DirectRunner "
        "--direct_num_workers 2 --direct_running_mode multi_processing",
    )
    b.add_argument("embeddings", help="embedding shards: a file, a folder of *.parquet or a glob (local or gs://)")
    b.add_argument("out", help="memory directory or gs:// URL to create")
    b.add_argument("--num-shards", type=count, default=None,
                   help=f"number of shards (partitions); default: ceil(rows / {TARGET_SHARD_ITEMS:,}) from the Parquet "
                        f"footers' row counts, i.e. shards of at most {TARGET_SHARD_ITEMS:,} items: the benchmarks here "
                        "serve best from 100k-150k items per shard, and ScaNN builds trees from 5,000 items per shard "
                        "(brute force below 20,000), so a memory under that size is one shard")
    b.add_argument("--class-names", default=None,
                   help="class names: " + CLASS_NAMES_HELP + ". Default: the names the embedding shards record "
                        "('vismem embed' records its source's); needed only where they record none. Names that "
                        "differ from the shards' are refused (their labels index the shards' names)")
    b.add_argument("--partition", choices=("hash", "kmeans"), default="hash",
                   help="hash: by id, stable (default); kmeans: by nearest centroid, enabling --probe-shards routing")
    b.add_argument("--backend", choices=("scann", "exact"), default="scann", help="index backend (default scann)")
    b.add_argument("--storage", "--storage-dtype", dest="storage",
                   choices=("float32", "float16", "int8", "codes", "pca"), default="float32",
                   help="how vectors are stored: float32 (default); float16 (ScaNN reorders on bfloat16); int8 "
                        "(per-vector scaled; ScaNN reorders on its int8); codes (ScaNN only: searches on its "
                        "4-bit-per-dimension hashing codes alone, keeping a 4-bit copy on disk for rebuilds); "
                        "pca (exact only: PCA transform codes, an eighth of float32's bytes with the shard's "
                        "codebook, bits given to the axes the votes depend on; see README's storage table)")
    b.add_argument("--target-recall", type=_target_recall, default=0.95,
                   help="tune each ScaNN shard's leaves searched and candidates reordered to this recall@10 "
                        "against brute force, measured on a sample of its items (default 0.95; 'off': keep "
                        "the defaults); the measured recall is recorded per shard (vismem info)")
    b.add_argument("--tuning-queries", default=None,
                   help="embedding shards of real queries (a file, folder or glob) to tune on as well")
    b.add_argument("--dim", type=count, default=None, help="embedding dimension (default: the inputs' majority)")
    b.add_argument("--norm-tolerance", type=finite, default=0.01,
                   help="reject rows whose L2 norm is further than this from 1 (negative: accept any non-zero norm)")
    b.add_argument("--kmeans-sample", type=count, default=None,
                   help="rows sampled to train the k-means cells (default: 256 per cell, 100,000 to 1,000,000)")
    b.add_argument("--kmeans-cells", type=count, default=None,
                   help="k-means cells, grouped into the shards (default: 16 per shard); a query visits the "
                        "shards of its nearest cells, so more cells route more precisely")
    b.add_argument("--seed", type=non_negative_int, default=0, help="k-means seed")
    _add_scann_overrides(b)
    b.set_defaults(func=_run_build)


def _add_scann_overrides(b) -> None:
    g = b.add_argument_group("ScaNN overrides (default: chosen from each shard's size)")
    g.add_argument("--scann-brute-force", choices=("auto", "yes", "no"), default="auto",
                   help="auto: brute force below 5,000 items per shard")
    g.add_argument("--scann-num-leaves", type=count, help="tree leaves (default about sqrt(n))")
    g.add_argument("--scann-leaves-to-search", type=count, help="leaves searched per query (default 5%% of leaves)")
    g.add_argument("--scann-reorder", type=count, help="candidates re-scored exactly (default 100)")
    g.add_argument("--scann-training-sample-size", type=count, help="rows used to train the tree")
    g.add_argument("--scann-dims-per-block", type=count, help="asymmetric hashing dimensions per block (default 2)")
    g.add_argument("--scann-aq-threshold", type=finite, help="anisotropic quantization threshold (default 0.2)")


def add_add(sub) -> None:
    a = sub.add_parser(
        "add", beam_options=True, help="add items (samples, new classes) to a memory as a new version (Beam)",
        description="Validate and add the rows of embedding shards to the latest version of MEMORY, in the "
        "memory's partitions, backend and parameters, and publish a new version. Ids the memory holds, or "
        "ever removed (its forget list), go to the dead letter unless --readmit. New classes: pass "
        "--class-names with the memory's classes first and the new ones appended. " + BEAM_HELP,
        epilog="example: vismem add /data/fmnist-memory 'new/*.parquet' --class-names classes_plus_digits.txt",
    )
    a.add_argument("memory", help="memory directory or gs:// URL")
    a.add_argument("embeddings", help="embedding shards: a file, a folder of *.parquet or a glob")
    a.add_argument("--class-names", default=None,
                   help="the memory's classes followed by new ones: " + CLASS_NAMES_HELP + ". Default: the memory's, "
                        "extended by the names the embedding shards record when those start with the memory's")
    a.add_argument("--readmit", action="store_true", help="accept ids that were removed (unlearned) before")
    a.add_argument("--norm-tolerance", type=finite, default=0.01, help="as for build")
    a.set_defaults(func=_run_add)


def add_compact(sub) -> None:
    c = sub.add_parser(
        "compact", beam_options=True, help="rewrite shards without removed items; merge added shards (Beam)",
        description="Rewrite every partition of MEMORY that holds removed items, or that 'add' spread over "
        "several shards, into one shard each, and publish a new version. " + BEAM_HELP,
        epilog="example: vismem compact /data/fmnist-memory --direct_num_workers 2",
    )
    c.add_argument("memory", help="memory directory or gs:// URL")
    c.add_argument("--no-merge", action="store_true", help="only drop removed items; keep added shards apart")
    c.set_defaults(func=_run_compact)
