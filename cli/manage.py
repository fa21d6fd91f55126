"""``vismem query``, ``info``, ``remove``, ``versions`` and ``gc``: operations on a memory in place."""
from __future__ import annotations

from cli import terminal
from cli.common import add_filters, add_ties, count, finite, fraction, item_filter, non_negative, positive
from memory import voting


def _run_query(a) -> dict:
    from memory.query import query_memory

    term = terminal.current()
    result = query_memory(a.memory, a.queries, k=a.k, method=a.method, out=a.out, batch_size=a.batch_size,
                          version=a.version, alpha=a.alpha, tau=a.tau, xi=a.xi, probe_shards=a.probe_shards,
                          probe_margin=a.probe_margin, ties=a.ties, abstain_below=a.abstain_below,
                          where=item_filter(a), progress=term)
    accuracy = f", top-1 accuracy {result['top1_accuracy']:.4f}" if "top1_accuracy" in result else ""
    term.summary(f"classified {result['queries']:,} queries at k={a.k} ({a.method}){accuracy}"
                 + (f"; predictions: {a.out}" if a.out else ""))
    return result


def _run_info(a) -> dict:
    from memory.info import memory_info

    return memory_info(a.memory, a.version)


def _run_remove(a) -> dict:
    from memory.mutations import read_id_file, remove_items

    return remove_items(a.memory, ids=read_id_file(a.ids) if a.ids else None, label=a.label, source=a.source,
                        reason=a.reason)


def _run_versions(a) -> list:
    from memory.mutations import version_history

    return version_history(a.memory)


def _run_gc(a) -> dict:
    from memory.mutations import collect_garbage

    return collect_garbage(a.memory, a.keep, dry_run=a.dry_run)


def add_query(sub) -> None:
    q = sub.add_parser(
        "query", help="classify query embeddings against a memory",
        description="Classify every row of QUERIES (an embedding shard in the DESIGN.md schema) by its k "
        "nearest neighbours in MEMORY and a voting rule. Prints a JSON summary (with top-1 accuracy "
        "when the queries carry labels) and, with --out, writes one row per query: prediction, its "
        "confidence (the voted class's share of the vote) and whether it abstained, neighbour ids, labels "
        "and similarities.",
        epilog="example: vismem query /data/fmnist-memory test.parquet --k 50 --method rank --out preds.parquet",
    )
    q.add_argument("memory", help="memory directory or gs:// URL")
    q.add_argument("queries", help="embedding shard(s) with the query embeddings: a Parquet file, a folder, or a glob")
    q.add_argument("--k", type=count, default=50,
                   help="neighbours that vote (default 50; at most the memory's live items)")
    q.add_argument("--method", choices=voting.METHODS, default="rank", help="voting rule (default rank)")
    q.add_argument("--alpha", type=positive, default=2.0, help="rank voting offset: w = 1/(alpha + rank)")
    q.add_argument("--tau", type=positive, default=0.07, help="softmax voting temperature")
    q.add_argument("--xi", type=finite, default=1.0, help="distance voting exponent")
    add_ties(q)
    q.add_argument("--abstain-below", type=fraction, default=None, metavar="C",
                   help="answer -1 (flagged abstained) when the voted class's share of the vote is below C, "
                   "a number in [0, 1] (default: always answer)")
    q.add_argument("--version", type=count, default=None, help="memory version to pin (default latest)")
    q.add_argument("--batch-size", type=count, default=4096, help="queries per search batch")
    q.add_argument("--probe-shards", type=count, default=None,
                   help="k-means memories: search each query only in the P shards holding its most similar k-means cells")
    q.add_argument("--probe-margin", type=non_negative, default=None, metavar="M",
                   help="k-means memories: visit the 2nd..P-th nearest shards (every shard without --probe-shards) only "
                   "where a query's similarity to them is within M (cosine) of its nearest shard's; real embeddings "
                   "need far fewer shard visits for the same recall (e.g. --probe-shards 4 --probe-margin 0.08)")
    add_filters(q)
    q.add_argument("--out", default=None,
                   help="write predictions + neighbours to this Parquet file (a file path, not a folder)")
    q.set_defaults(func=_run_query)


def add_info(sub) -> None:
    i = sub.add_parser("info", help="show a memory's manifest summary",
                       description="Print a memory's version, format, backend, classes and shards as JSON.")
    i.add_argument("memory", help="memory directory or gs:// URL")
    i.add_argument("--version", type=count, default=None, help="version (default latest)")
    i.set_defaults(func=_run_info)


def add_remove(sub) -> None:
    r = sub.add_parser(
        "remove", help="remove items (unlearning): durable at once, excluded from every later query",
        description="Record removed items in a new version of MEMORY (tombstones + forget list, checksummed) "
        "before returning. Every Memory.open from then on excludes them and still returns k neighbours; "
        "'vismem compact' later rewrites the shards without them; 'vismem add' refuses their ids unless "
        "--readmit. Safe to run beside other writers: it is derived from the latest version and derived again "
        "when another change publishes first. Refused (nothing published): an empty id file, a class or source "
        "no item has. Selected items that are already removed publish nothing (\"changed\": false).",
        epilog="example: vismem remove /data/fmnist-memory --ids forget-me.txt --reason 'GDPR request 42'",
    )
    r.add_argument("memory", help="memory directory or gs:// URL")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", help="file of ids: one per line (UTF-8), or Parquet with an 'id' column")
    which.add_argument("--label", help="remove every item of this class name")
    which.add_argument("--source", help="remove every item from this source (dataset name)")
    r.add_argument("--reason", default=None, help="why (kept in the forget list)")
    r.set_defaults(func=_run_remove)


def add_versions(sub) -> None:
    v = sub.add_parser("versions", help="list a memory's versions and what changed",
                       description="One JSON record per published version: parent, change, items, removed "
                       "items awaiting compaction, forgotten ids, shards, reader leases.",
                       epilog="example: vismem versions /data/fmnist-memory")
    v.add_argument("memory", help="memory directory or gs:// URL")
    v.set_defaults(func=_run_versions)


def add_gc(sub) -> None:
    gc = sub.add_parser("gc", help="delete old versions' files (never the current or a leased one)",
                        description="Keep the newest N versions, the current one and every version a reader "
                        "holds a lease on (Memory.open(..., lease_s=...)); delete the other manifests, then "
                        "every shard folder and state file no kept version uses, and leftovers of builds "
                        "that never published. Safe beside running writers: a version published while gc runs "
                        "keeps what it uses, and a running add or compact holds its parent and its folders.",
                        epilog="example: vismem gc /data/fmnist-memory --keep 3 --dry-run")
    gc.add_argument("memory", help="memory directory or gs:// URL")
    gc.add_argument("--keep", type=int, required=True, help="newest versions to keep (>= 1)")
    gc.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    gc.set_defaults(func=_run_gc)
