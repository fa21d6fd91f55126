"""Memory pruning experiment (section 3.5, Table 3): hard and soft pruning for every voting rule."""
from __future__ import annotations

import numpy as np

from eval import pruning
from eval.experiments.common import Split, neighbours, table, tie_note
from memory import voting


def run(memory: Split, queries: Split, class_names, *, k: int = 10, self_k: int = 10,
        hard_thresholds=(2, 4, 8, 16), over_fetch: int = 100, ties: str = "nearest") -> dict:
    """Accuracy of each rule with no pruning, hard pruning at each threshold, and soft pruning.

    ``self_k`` neighbours per self-query count towards each item's wrong contributions ``v``. Hard
    pruning marks pruned neighbours excluded, so later ones move up; ``over_fetch`` extra
    neighbours are retrieved so that k remain. ``ties`` settles tied votes (``memory.voting.TIES``).
    """
    note = tie_note(ties)
    num_classes = len(class_names)
    self_nb = neighbours(memory, memory.embeddings, self_k + 1, class_names)
    v = pruning.wrong_contributions(memory.ids, memory.labels, self_nb.ids, self_nb.labels, memory.ids, k=self_k)
    nb = neighbours(memory, queries.embeddings, k + over_fetch, class_names)
    pos = {i: n for n, i in enumerate(memory.ids.astype(str))}
    item = np.vectorize(pos.get)(nb.ids.astype(str))
    v_nb = v[item]
    rows, figures = [], {"v_histogram": np.bincount(np.minimum(v, 50)).tolist(), "accuracy": {}}
    settings = [("none", None, None)] + [(f"hard v>={t}", t, None) for t in hard_thresholds] + \
        [("soft", None, pruning.soft_weights(v_nb))]
    for name, threshold, weights in settings:
        labels = nb.labels if threshold is None else np.where(
            pruning.hard_keep(v_nb, threshold), nb.labels, voting.EXCLUDED)
        accs = {}
        for method in voting.METHODS:
            pred = voting.predict(labels, nb.sims, method=method, num_classes=num_classes, k=k, weights=weights,
                                  ties=ties)
            accs[method] = float((pred == queries.labels).mean())
        pruned = 0 if threshold is None else int((~pruning.hard_keep(v, threshold)).sum())
        figures["accuracy"][name] = {**accs, "items_pruned": pruned}
        rows.append([name, pruned, *(f"{100 * accs[m]:.2f}" for m in voting.METHODS)])
    lines = ["## Memory pruning (section 3.5, Table 3)", "",
             f"Self-query of the {len(memory)} memory items at K = {self_k} (self-match left out) counts each "
             f"item's wrong contributions v; {int((v > 0).sum())} items have v > 0. Accuracy (%) at k = {k}{note}:", ""]
    lines += table(["pruning", "items removed", *voting.METHODS], rows)
    none, soft = figures["accuracy"]["none"], figures["accuracy"]["soft"]
    best_hard = max((figures["accuracy"][n] for n, t, _ in settings if t), key=lambda a: a["rank"])
    lines += ["", f"Finding (paper: soft > hard > none): soft {'beats' if soft['rank'] > best_hard['rank'] else 'does not beat'} "
              f"the best hard threshold for rank voting ({100 * soft['rank']:.2f} vs {100 * best_hard['rank']:.2f}); "
              f"no pruning {100 * none['rank']:.2f}.", ""]
    return {"figures": figures, "report": "\n".join(lines)}
