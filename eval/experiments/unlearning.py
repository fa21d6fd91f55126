"""Unlearning (section 3.4): remove a forget set from a memory and check it is gone, at once.

Figures: forget-set items retrieved after removal (must be 0, also when the forget items themselves
are the queries), retain-set accuracy before and after, the time ``remove`` took, and whether every
prediction equals that of a memory rebuilt from scratch without the forget set.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from eval.experiments.common import Split, table, tie_note
from memory.memory import Memory, write_memory
from memory.mutations import remove_items


def run(memory: Split, queries: Split, class_names, *, forget_fraction: float = 0.05, k: int = 10,
        method: str = "rank", num_shards: int = 4, seed: int = 0, workdir: str | None = None,
        ties: str = "nearest") -> dict:
    """Remove a random ``forget_fraction`` of ``memory``; figures and report as the module says
    (``ties`` settles tied votes, ``memory.voting.TIES``)."""
    note = tie_note(ties)
    rng = np.random.default_rng(seed)
    forget = rng.random(len(memory)) < forget_fraction
    forget_ids = set(memory.ids[forget].astype(str))
    probe = np.concatenate([queries.embeddings, memory.embeddings[forget]])
    with tempfile.TemporaryDirectory(dir=workdir, prefix="vismem-unlearn-") as tmp:
        path, rebuilt = os.path.join(tmp, "memory"), os.path.join(tmp, "rebuilt")
        write_memory(path, memory.embeddings, memory.labels, memory.ids, num_shards=num_shards,
                     class_names=class_names)
        with Memory.open(path) as mem:
            before = mem.classify(queries.embeddings, k, method, ties=ties)
            hits_before = int(np.isin(mem.search(probe, k).ids.astype(str), list(forget_ids)).sum())
        t0 = time.perf_counter()
        removal = remove_items(path, ids=sorted(forget_ids), reason="unlearning experiment")
        remove_s = time.perf_counter() - t0
        with Memory.open(path) as mem:
            after = mem.classify(queries.embeddings, k, method, ties=ties)
            found = mem.search(probe, k).ids.astype(str)
        write_memory(rebuilt, memory.embeddings[~forget], memory.labels[~forget], memory.ids[~forget],
                     num_shards=num_shards, class_names=class_names)
        with Memory.open(rebuilt) as mem:
            scratch = mem.classify(queries.embeddings, k, method, ties=ties)
    hits_after = int(np.isin(found, list(forget_ids)).sum())
    fig = {
        "memory_items": len(memory), "forget_items": len(forget_ids), "removed": removal["removed"],
        "forget_hits_before": hits_before, "forget_hits_after": hits_after, "remove_seconds": remove_s,
        "accuracy_before": float((before.predictions == queries.labels).mean()),
        "accuracy_after": float((after.predictions == queries.labels).mean()),
        "equals_rebuilt": bool((after.predictions == scratch.predictions).all()
                               and (after.neighbours.ids == scratch.neighbours.ids).all()),
        "version": removal["version"],
    }
    lines = ["## Unlearning (section 3.4)", "",
             f"{fig['forget_items']} of {len(memory)} memory items ({100 * forget_fraction:.0f}%) removed with "
             f"`vismem remove` semantics in {remove_s:.2f} s (new version {fig['version']}); {method} voting, "
             f"k = {k}{note}.", ""]
    lines += table(["", "before removal", "after removal"], [
        ["forget-set items among the neighbours of the queries and of the forget items themselves",
         hits_before, hits_after],
        ["accuracy on the queries (%)", f"{100 * fig['accuracy_before']:.2f}", f"{100 * fig['accuracy_after']:.2f}"],
    ])
    lines += ["", f"Every neighbour list and prediction after removal equals a memory rebuilt without the forget set: "
              f"**{'yes' if fig['equals_rebuilt'] else 'NO'}**.", ""]
    return {"figures": fig, "report": "\n".join(lines)}
