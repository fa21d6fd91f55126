"""Memory pruning experiment (section 3.5, Table 3): hard and soft pruning for every voting rule.

The memory is written once, its wrong contributions ``v`` are counted once with the memory operation
(``memory.pruning``, what ``vismem prune`` runs), and each setting is published as a version of that
one memory: soft pruning first (new weights), then hard pruning at each threshold from the highest
down (each removes a superset of the one before). Every accuracy comes from searching the version
that setting published.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from eval.experiments.common import Split, table, tie_note
from memory import pruning, voting
from memory.memory import Memory, write_memory


def _accuracy(path: str, version: int, queries: Split, k: int, num_classes: int, *, weighted: bool,
              ties: str) -> dict:
    """Accuracy of each voting rule over version ``version``'s k nearest neighbours of the queries."""
    with Memory.open(path, version, verify=False) as mem:
        nb = mem.search(queries.embeddings, min(k, len(mem)))
    return {method: float((voting.predict(nb.labels, nb.sims, method=method, num_classes=num_classes, k=k,
                                          weights=nb.weights if weighted else None, ties=ties)
                           == queries.labels).mean())
            for method in voting.METHODS}


def run(memory: Split, queries: Split, class_names, *, k: int = 10, self_k: int = 10,
        hard_thresholds=(2, 4, 8, 16), ties: str = "nearest", num_shards: int = 4,
        workdir: str | None = None) -> dict:
    """Accuracy of each rule with no pruning, hard pruning at each threshold, and soft pruning.

    ``self_k`` neighbours per self-query count towards each item's wrong contributions ``v``. Hard
    pruning removes items from the memory, so later neighbours move up; soft pruning sets the items'
    vote weights. ``ties`` settles tied votes (``memory.voting.TIES``). The memory is written once,
    in ``num_shards`` exact shards, under ``workdir`` (default: the system's temporary folder).
    """
    note = tie_note(ties)
    num_classes = len(class_names)
    rules = [pruning.Rule.hard(t) for t in sorted(set(hard_thresholds), reverse=True)]  # refused before any work
    with tempfile.TemporaryDirectory(dir=workdir, prefix="vismem-prune-") as tmp:
        path = os.path.join(tmp, "memory")
        write_memory(path, memory.embeddings, memory.labels, memory.ids, num_shards=num_shards,
                     class_names=class_names)
        counts = pruning.count_wrong(path, self_k=self_k)
        v = counts.of(memory.ids)
        figures = {"v_histogram": np.bincount(np.minimum(v, 50)).tolist(), "accuracy": {}, "versions": {}}
        acc = figures["accuracy"]
        acc["none"] = {**_accuracy(path, 1, queries, k, num_classes, weighted=False, ties=ties), "items_pruned": 0}
        soft = pruning.prune_in_process(path, pruning.Rule.soft(), self_k=self_k, counts=counts)
        acc["soft"] = {**_accuracy(path, soft["version"], queries, k, num_classes, weighted=True, ties=ties),
                       "items_pruned": 0}
        figures["versions"]["soft"] = soft["version"]
        for rule in rules:
            name = f"hard v>={rule.threshold}"
            hard = pruning.prune_in_process(path, rule, self_k=self_k, counts=counts)
            acc[name] = {**_accuracy(path, hard["version"], queries, k, num_classes, weighted=False, ties=ties),
                         "items_pruned": int((~pruning.hard_keep(v, rule.threshold)).sum())}
            figures["versions"][name] = hard["version"]
    names = ["none"] + [f"hard v>={t}" for t in hard_thresholds] + ["soft"]
    rows = [[n, acc[n]["items_pruned"], *(f"{100 * acc[n][m]:.2f}" for m in voting.METHODS)] for n in names]
    lines = ["## Memory pruning (section 3.5, Table 3)", "",
             f"Self-query of the {len(memory)} memory items at K = {self_k} (self-match left out) counts each "
             f"item's wrong contributions v; {int((v > 0).sum())} items have v > 0. Each setting is a version of "
             f"one memory, pruned as `vismem prune` does (soft: new vote weights; hard: items removed). "
             f"Accuracy (%) at k = {k}{note}:", ""]
    lines += table(["pruning", "items removed", *voting.METHODS], rows)
    none, soft_acc = acc["none"], acc["soft"]
    best_hard = max((acc[n] for n in names if n.startswith("hard")), key=lambda a: a["rank"], default=none)
    lines += ["", f"Finding (paper: soft > hard > none): soft "
              f"{'beats' if soft_acc['rank'] > best_hard['rank'] else 'does not beat'} "
              f"the best hard threshold for rank voting ({100 * soft_acc['rank']:.2f} vs {100 * best_hard['rank']:.2f}); "
              f"no pruning {100 * none['rank']:.2f}.", ""]
    return {"figures": figures, "report": "\n".join(lines)}
