"""Metrics computed from one retrieval pass: pure numpy on ``(Q, K)`` neighbour label/similarity arrays.

Every function takes the neighbours of a single search at ``k_max`` (best first) and derives its
figure for every k by slicing or cumulative sums, as DESIGN.md specifies:

- :func:`accuracy_all_k`: top-1 accuracy of each voting rule at every k = 1..K;
- :func:`hit_rate`: share of queries whose true label is among the first k labels (Appendix D);
- :func:`neighbour_reliability` and :func:`fit_log`: accuracy of the i-th neighbour alone and the
  ``acc = a * ln(i) + b`` fit (Figure 1);
- :func:`calibration`: accuracy against the plurality-class count among the first 100 neighbours,
  and against ``1 - entropy / max_entropy`` (Appendix I).
"""
from __future__ import annotations

import numpy as np

from memory import voting


def _check(labels, truth):
    labels = np.asarray(labels)
    truth = np.asarray(truth)
    if labels.ndim != 2 or truth.shape != (labels.shape[0],):
        raise ValueError(f"labels must be (Q, K) and truth (Q,), got {labels.shape} and {truth.shape}")
    return labels, truth


def accuracy_all_k(labels, sims, truth, *, num_classes, methods=voting.METHODS, weights=None,
                   alpha=2.0, tau=0.07, xi=1.0, ties="nearest") -> dict:
    """``{method: accuracy (K,)}``: top-1 accuracy at every k for each voting rule (tie rule ``ties``)."""
    labels, truth = _check(labels, truth)
    preds = voting.predict_all_k_methods(labels, sims, methods=tuple(methods), num_classes=num_classes,
                                         weights=weights, alpha=alpha, tau=tau, xi=xi, ties=ties)
    return {method: (p == truth[:, None]).mean(axis=0) for method, p in preds.items()}


def hit_rate(labels, truth) -> np.ndarray:
    """``(K,)``: the share of queries whose true label appears among the first k neighbours' labels."""
    labels, truth = _check(labels, truth)
    hits = np.cumsum(labels == truth[:, None], axis=1) > 0
    return hits.mean(axis=0)


def neighbour_reliability(labels, truth) -> np.ndarray:
    """``(K,)``: top-1 accuracy of the i-th neighbour's label alone (index 0 = nearest)."""
    labels, truth = _check(labels, truth)
    return (labels == truth[:, None]).mean(axis=0)


def fit_log(values) -> tuple[float, float]:
    """Least-squares ``values[i-1] = a * ln(i) + b`` over i = 1..len(values); returns ``(a, b)``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"need a 1-d series of at least 2 values, got shape {values.shape}")
    a, b = np.polyfit(np.log(np.arange(1, len(values) + 1)), values, 1)
    return float(a), float(b)


def calibration(labels, truth, *, num_classes, k: int = 100, ties="nearest") -> dict:
    """Accuracy of the plurality prediction binned by agreement among the first ``k`` neighbours.

    Returns ``{"count": {c: (accuracy, n_queries)}, "certainty": (bin_edges, accuracy, n)}`` where
    ``c`` is how many of the k neighbours carry the plurality class, and certainty is
    ``1 - entropy / log(num_classes)`` of the neighbour label histogram, in 10 equal bins.
    """
    labels, truth = _check(labels, truth)
    k = min(k, labels.shape[1])
    lab = labels[:, :k]
    counts = np.zeros((len(lab), num_classes), dtype=np.int64)
    valid = lab >= 0
    np.add.at(counts, (np.repeat(np.arange(len(lab)), k)[valid.ravel()], lab[valid]), 1)
    pred = voting.predict(lab, np.zeros(lab.shape), method="plurality", num_classes=num_classes, ties=ties)
    correct = pred == truth
    top = counts.max(axis=1)
    by_count = {int(c): (float(correct[top == c].mean()), int((top == c).sum())) for c in np.unique(top)}
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    certainty = 1.0 - entropy / np.log(num_classes) if num_classes > 1 else np.ones(len(lab))
    edges = np.linspace(0.0, 1.0, 11)
    which = np.clip(np.digitize(certainty, edges[1:-1]), 0, 9)
    acc = np.array([correct[which == b].mean() if (which == b).any() else np.nan for b in range(10)])
    n = np.bincount(which, minlength=10)
    return {"count": by_count, "certainty": (edges, acc, n)}
