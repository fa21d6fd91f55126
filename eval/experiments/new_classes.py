"""Adding new classes without training (section 3.1, Table 1): old-class accuracy before and after."""
from __future__ import annotations

import numpy as np

from eval.experiments.common import Split, neighbours, table, tie_note
from memory import voting


def run(memory: Split, queries: Split, class_names, new_classes, *, k: int = 10, method: str = "rank",
        extra: tuple | None = None, ties: str = "nearest") -> dict:
    """Accuracy on old classes with and without the ``new_classes`` in memory, and on the new ones.

    ``extra`` optionally adds classes from another dataset: ``(memory Split, query Split, names)``
    whose labels are 0-based in ``names``; they are appended after ``class_names``. ``ties`` settles
    tied votes (``memory.voting.TIES``).
    """
    note = tie_note(ties)
    new_ids = [class_names.index(c) if isinstance(c, str) else int(c) for c in new_classes]
    names = list(class_names)
    mem_all, q_all = memory, queries
    if extra is not None:
        x_mem, x_q, x_names = extra
        offset = len(names)
        names += list(x_names)
        mem_all = Split(np.concatenate([memory.embeddings, x_mem.embeddings]),
                        np.concatenate([memory.labels, x_mem.labels + offset]),
                        np.concatenate([memory.ids, x_mem.ids]))
        q_all = Split(np.concatenate([queries.embeddings, x_q.embeddings]),
                      np.concatenate([queries.labels, x_q.labels + offset]),
                      np.concatenate([queries.ids, x_q.ids]))
        new_ids += list(range(offset, offset + len(x_names)))
    is_new_mem = np.isin(mem_all.labels, new_ids)
    is_new_q = np.isin(q_all.labels, new_ids)

    def accuracy(mem: Split, q: Split):
        nb = neighbours(mem, q.embeddings, k, names)
        pred = voting.predict(nb.labels, nb.sims, method=method, num_classes=len(names), k=min(k, len(mem)),
                              ties=ties)
        return pred == q.labels

    before = accuracy(mem_all.take(~is_new_mem), q_all.take(~is_new_q))
    after = accuracy(mem_all, q_all)
    fig = {"old_before": float(before.mean()), "old_after": float(after[~is_new_q].mean()),
           "new_after": float(after[is_new_q].mean()), "new_classes": [names[i] for i in new_ids],
           "new_items_added": int(is_new_mem.sum())}
    lines = ["## New classes without training (section 3.1, Table 1)", "",
             f"{len(fig['new_classes'])} classes ({', '.join(fig['new_classes'])}) left out of memory, then their "
             f"{fig['new_items_added']} items and names inserted; {method} voting, k = {k}{note}. Accuracy (%):", ""]
    lines += table(["memory", "old classes", "new classes"], [
        ["without the new classes", f"{100 * fig['old_before']:.2f}", "-"],
        ["with the new classes inserted", f"{100 * fig['old_after']:.2f}", f"{100 * fig['new_after']:.2f}"],
    ])
    delta = 100 * (fig["old_after"] - fig["old_before"])
    lines += ["", f"Finding (paper: new classes barely change old-class accuracy): old-class accuracy "
              f"changed by {delta:+.2f} points.", ""]
    return {"figures": fig, "report": "\n".join(lines)}
