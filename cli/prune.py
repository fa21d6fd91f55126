"""``vismem prune``: hard or soft memory pruning (Appendix G) published as a new version of a memory (Beam)."""
from __future__ import annotations

from cli import terminal
from cli.build import BEAM_HELP
from cli.common import count, non_negative, positive


def _run_prune(a) -> dict:
    from pipelines.prune import prune_memory

    term = terminal.current()
    term.output_folder(a.memory)  # Beam's logs go to MEMORY/logs/ (a local memory), as compact's do
    result = prune_memory(a.memory, self_k=a.self_k, hard=a.hard, soft=a.soft, c=a.c, dd=a.dd,
                          probe_shards=a.probe_shards, pipeline_args=a.beam_args, progress=term)
    counted = (f"{result.get('items_with_wrong', 0):,} of {result.get('items_queried', 0):,} items misled a "
               f"neighbour at K={a.self_k}")
    if not result["changed"]:
        term.summary(f"nothing pruned in {a.memory} (version {result['version']} is current): {counted}")
    else:
        what = (f"{result.get('removed', 0):,} items removed (v >= {a.hard})" if a.hard is not None
                else "vote weights set to dd / (c + v)")
        term.summary(f"pruned {a.memory} to version {result['version']}: {what}; {counted}; "
                     f"{result['wall_seconds']:.1f} s")
    return result


def add_prune(sub) -> None:
    p = sub.add_parser(
        "prune", beam_options=True, help="drop or down-weight items that mislead their neighbours (Beam)",
        description="Query every live item of MEMORY against the memory itself (its own match left out) and count, "
        "per item, how often it was one of the first K neighbours of another item with a different label: its "
        "wrong contributions v (paper, Appendix G). Then publish a new version: --hard T tombstones every item "
        "with v >= T (reason 'pruned'; not forgotten, so 'vismem add' may bring it back; 'vismem compact' "
        "drops the rows), --soft sets each item's vote weight to dd / (c + v) (1 where v = 0; shards are "
        "republished with new items tables, their indices untouched). 'vismem versions' shows the prune and "
        "its parameters; readers pinned to an older version are unaffected. Nothing is published when nothing "
        "changes (\"changed\": false). Each worker opens the whole memory once and counts one shard at a time. "
        + BEAM_HELP,
        epilog="examples: vismem prune /data/fmnist-memory --self-k 100 --hard 128 | "
        "vismem prune /data/fmnist-memory --self-k 10 --soft | "
        "vismem prune gs://b/memory --self-k 10 --soft --c 1 --dd 1.75 --probe-shards 2 --direct_num_workers 2",
    )
    p.add_argument("memory", help="memory directory or gs:// URL")
    p.add_argument("--self-k", type=count, required=True, metavar="K",
                   help="neighbours of each self-query that count towards v (paper: 100 for hard, 10 for soft); "
                        "fewer than the memory's live items")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--hard", type=count, metavar="THRESHOLD",
                     help="remove items with v >= THRESHOLD, an integer >= 1 (paper: 128 at K = 100)")
    how.add_argument("--soft", action="store_true",
                     help="set each item's vote weight to gamma = dd / (c + v), 1 where v = 0")
    p.add_argument("--c", type=non_negative, default=None, help="soft pruning's c (default 1)")
    p.add_argument("--dd", type=positive, default=None, help="soft pruning's dd (default 1.75: 0.875, 0.159, "
                   "0.017 for v = 1, 10, 100)")
    p.add_argument("--probe-shards", type=count, default=None, metavar="P",
                   help="k-means memories: search each self-query only in the P shards nearest to it (as "
                        "'vismem query --probe-shards'); default every shard")
    p.set_defaults(func=_run_prune)
