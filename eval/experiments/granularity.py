"""Flexibly increasing granularity (section 3.6, Figure 5): a newly discovered class, exemplar by exemplar."""
from __future__ import annotations

import numpy as np

from eval import hierarchy
from eval.experiments.common import Split, table


def run(memory: Split, queries: Split, class_names, tree, held_out, *, exemplars=(0, 1, 2, 5, 10, 20, 50),
        max_queries: int = 100, seed: int = 0) -> dict:
    """Per-level accuracy of Algorithm 1 on queries of ``held_out`` as its exemplars enter memory."""
    rng = np.random.default_rng(seed)
    cls = class_names.index(held_out) if isinstance(held_out, str) else int(held_out)
    others = memory.labels != cls
    pool = rng.permutation(np.flatnonzero(~others))
    q_rows = np.flatnonzero(queries.labels == cls)
    q_rows = q_rows[rng.permutation(len(q_rows))[:max_queries]]
    rows, figures = [], {}
    for n in exemplars:
        keep = np.concatenate([np.flatnonzero(others), pool[:n]])
        emb, lab = memory.embeddings[keep], memory.labels[keep]
        cache = {}
        paths = [hierarchy.predict_path(queries.embeddings[i], tree, emb, lab, class_names, cache=cache)
                 for i in q_rows]
        acc = hierarchy.level_accuracy(paths, [class_names[cls]] * len(q_rows), tree)
        figures[int(min(n, len(pool)))] = acc
        rows.append([min(n, len(pool)), *(f"{100 * a:.1f}" for a in acc)])
    lines = ["## A newly discovered class (section 3.6, Algorithm 1, Figure 5)", "",
             f"Queries of `{class_names[cls]}` ({len(q_rows)}) placed in the class tree by the Kolmogorov-Smirnov "
             "descent, as exemplars of the class enter memory. Accuracy (%) per level:", ""]
    lines += table(["exemplars in memory", *(f"level {i + 1}" for i in range(tree.depth()))], rows)
    first = figures[min(figures)]
    lines += ["", f"With no exemplar the class can only be placed at level 1: {100 * first[0]:.1f}% there.", ""]
    return {"figures": figures, "report": "\n".join(lines)}
