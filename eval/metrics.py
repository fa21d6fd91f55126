"""Metrics computed from one retrieval pass: pure numpy on ``(Q, K)`` neighbour label/similarity arrays.

Every function takes the neighbours of a single search at ``k_max`` (best first) and derives its
figure for every k by slicing or cumulative sums, as DESIGN.md specifies:

- :func:`accuracy_all_k`: top-1 accuracy of each voting rule at every k = 1..K;
- :func:`hit_rate`: share of queries whose true label is among the first k labels (Appendix D);
- :func:`neighbour_reliability` and :func:`fit_log`: accuracy of the i-th neighbour alone and the
  ``acc = a * ln(i) + b`` fit (Figure 1);
- :func:`calibration`: accuracy against the plurality-class count among the first 100 neighbours,
  and against ``1 - entropy / max_entropy`` (Appendix I).

And from one voting rule's predictions and their confidences (``memory.confidence``: the voted
class's share of the vote), whether that confidence can be trusted and what abstaining buys:

- :func:`reliability`: the reliability diagram (equal-width confidence bins) and the expected
  calibration error;
- :func:`risk_coverage` and :func:`accuracy_at_coverage`: answering the most confident queries
  first, the accuracy of the answered ones against the share answered.
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

    Returns ``{"count": {c: (accuracy, n_queries)}, "count_bins": [(lo, hi, accuracy, n_queries)],
    "certainty": (bin_edges, accuracy, n)}`` where ``c`` is how many of the k neighbours carry the
    plurality class; ``count_bins`` groups the counts 1..k into at most 10 equal ranges (a count of
    0, no valid neighbour, joins the first) and lists those that hold queries, for a table that
    stays short at k = 100; certainty is ``1 - entropy / log(num_classes)`` of the neighbour label
    histogram, in 10 equal bins.
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
    width = -(-k // 10)  # ceil: at most 10 ranges of counts
    which_range = np.maximum(top - 1, 0) // width
    count_bins = [(int(b * width + 1), int(min((b + 1) * width, k)), float(correct[which_range == b].mean()),
                   int((which_range == b).sum())) for b in np.unique(which_range)]
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    certainty = 1.0 - entropy / np.log(num_classes) if num_classes > 1 else np.ones(len(lab))
    edges = np.linspace(0.0, 1.0, 11)
    which = np.clip(np.digitize(certainty, edges[1:-1]), 0, 9)
    acc = np.array([correct[which == b].mean() if (which == b).any() else np.nan for b in range(10)])
    n = np.bincount(which, minlength=10)
    return {"count": by_count, "count_bins": count_bins, "certainty": (edges, acc, n)}


def _check_confidence(confidence, correct):
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if confidence.ndim != 1 or correct.shape != confidence.shape or not len(confidence):
        raise ValueError(f"confidence and correct must be two (Q,) arrays with Q >= 1, got shapes "
                         f"{confidence.shape} and {correct.shape}")
    if not np.all((confidence >= 0) & (confidence <= 1)):
        raise ValueError("confidences must lie in [0, 1]")
    return confidence, correct


def reliability(confidence, correct, *, bins: int = 10) -> dict:
    """The reliability diagram over ``bins`` equal-width confidence bins, and the expected calibration error.

    Bin ``b`` holds the confidences in ``[b / bins, (b + 1) / bins)``, the last one also 1.0.

    Returns:
        ``{"edges": (bins + 1,), "count": (bins,) int, "confidence": (bins,) mean confidence,
        "accuracy": (bins,)}`` (NaN for an empty bin), and ``"ece"``: the count-weighted mean of
        ``|accuracy - mean confidence|`` over the bins, ``sum_b count_b / Q * |acc_b - conf_b|``.

    Example:
        >>> r = reliability([0.95, 0.95, 0.55, 0.45], [True, False, True, False])
        >>> r["count"].tolist(), round(r["ece"], 4)  # bins 9: (0.95, 0.5), 5: (0.55, 1.0), 4: (0.45, 0.0)
        ([0, 0, 0, 0, 1, 1, 0, 0, 0, 2], 0.45)
    """
    confidence, correct = _check_confidence(confidence, correct)
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)  # floor; 1.0 joins the last bin
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / count
        acc = np.bincount(which, weights=correct.astype(np.float64), minlength=bins) / count
    held = count > 0
    ece = float(np.sum(count[held] / len(confidence) * np.abs(acc[held] - mean_conf[held])))
    return {"edges": np.linspace(0.0, 1.0, bins + 1), "count": count, "confidence": mean_conf, "accuracy": acc,
            "ece": ece}


def risk_coverage(confidence, correct) -> dict:
    """Answer the most confident queries first: the accuracy of those answered against their share.

    Queries of equal confidence are answered together, since no threshold separates them (and
    the order of the queries then cannot change the curve): one point per distinct confidence,
    highest first. Point ``i`` answers the queries with ``confidence >= threshold[i]``, as
    ``abstain_below=threshold[i]`` would.

    Returns:
        ``{"threshold": (G,) descending, "coverage": (G,) ascending to 1, "accuracy": (G,),
        "risk": 1 - accuracy, "answered": (G,) int}``.
    """
    confidence, correct = _check_confidence(confidence, correct)
    values, group = np.unique(confidence, return_inverse=True)  # ascending
    values, group = values[::-1], len(values) - 1 - group.ravel()  # highest first
    answered = np.cumsum(np.bincount(group, minlength=len(values)))
    right = np.cumsum(np.bincount(group, weights=correct.astype(np.float64), minlength=len(values)))
    accuracy = right / answered
    return {"threshold": values, "coverage": answered / len(confidence), "accuracy": accuracy,
            "risk": 1.0 - accuracy, "answered": answered}


def accuracy_at_coverage(confidence, correct, coverage: float = 0.9) -> dict:
    """The accuracy when answering at least ``coverage`` of the queries, most confident first.

    The point of :func:`risk_coverage` with the highest threshold that answers at least
    ``ceil(coverage * Q)`` queries: with ties in confidence it may answer a little more.

    Returns:
        ``{"target": coverage, "threshold", "coverage", "accuracy", "answered"}``.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    curve = risk_coverage(confidence, correct)
    need = int(np.ceil(coverage * len(np.atleast_1d(confidence)) - 1e-9))
    i = int(np.searchsorted(curve["answered"], need))  # the first point answering >= need
    return {"target": float(coverage), "threshold": float(curve["threshold"][i]),
            "coverage": float(curve["coverage"][i]), "accuracy": float(curve["accuracy"][i]),
            "answered": int(curve["answered"][i])}
