"""Metrics computed from one retrieval pass: pure numpy on ``(Q, K)`` neighbour label/similarity arrays.

Every function takes the neighbours of a single search at ``k_max`` (best first) and derives its
figure for every k by slicing or cumulative sums, as DESIGN.md specifies:

- :func:`accuracy_all_k`: top-1 accuracy of each voting rule at every k = 1..K;
- :func:`hit_rate`: share of queries whose true label is among the first k labels (Appendix D);
- :func:`neighbour_reliability` and :func:`fit_log`: accuracy of the i-th neighbour alone and the
  ``acc = a * ln(i) + b`` fit (Figure 1);
- :func:`calibration`: accuracy against the plurality-class count among the first 100 neighbours,
  and against ``1 - entropy / max_entropy`` (Appendix I);
- :func:`distance_sums` and :func:`mean_distance`: the mean cosine distance to the i-th neighbour.

And from one voting rule's predictions and their confidences (``memory.confidence``: the voted
class's share of the vote), whether that confidence can be trusted and what abstaining buys:

- :func:`reliability`: the reliability diagram (equal-width confidence bins) and the expected
  calibration error;
- :func:`risk_coverage` and :func:`accuracy_at_coverage`: answering the most confident queries
  first, the accuracy of the answered ones against the share answered; :func:`coverage_histogram`
  and :func:`coverage_curve`: that curve at 1/1000 confidence resolution, for plots.

Figures that a streamed evaluation (``eval.streamed``) adds up batch by batch come in two halves:
additive counts (``*_counts``, ``*_sums``, ``*_bins``, ``*_histogram``: integers, merged by adding)
and the figure made from them (``*_from_*``). The one-call functions are the two halves in a row, so
a streamed evaluation and an in-process one compute every figure with the same arithmetic: sums
that floats would make depend on the order of the queries are kept exact, in integers.
"""
from __future__ import annotations

import math

import numpy as np

from memory import voting

# Distances are summed in integer units of 2**-32 (each rounded to the nearest, at most 1.2e-10 off):
# exact sums, whatever the order or the batches the queries come in; overflow past 2**30 queries.
DISTANCE_UNIT_BITS = 32
# Confidences (in [0, 1]) are summed in integer units of 2**-62: exact for every confidence of at
# least 2**-10 (a vote among at most 1,024 classes or neighbours), split into two 31-bit halves so that
# int64 sums hold 2**32 queries.
CONFIDENCE_UNIT_BITS = 62
_HALF = 31
CURVE_BINS = 1000  # confidence resolution of the plotted risk-coverage curve


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
    histogram, in 10 equal bins. :func:`calibration_counts`, then :func:`calibration_from_counts`.
    """
    return calibration_from_counts(calibration_counts(labels, truth, num_classes=num_classes, k=k, ties=ties))


def calibration_counts(labels, truth, *, num_classes, k: int = 100, ties="nearest") -> dict:
    """The additive half of :func:`calibration`: ``{"k", "top_n", "top_correct" ((k + 1,): queries and
    right predictions by plurality count 0..k), "certainty_n", "certainty_correct" ((10,))}``."""
    labels, truth = _check(labels, truth)
    k = min(k, labels.shape[1])
    lab = labels[:, :k]
    counts = np.zeros((len(lab), num_classes), dtype=np.int64)
    valid = lab >= 0
    np.add.at(counts, (np.repeat(np.arange(len(lab)), k)[valid.ravel()], lab[valid]), 1)
    pred = voting.predict(lab, np.zeros(lab.shape), method="plurality", num_classes=num_classes, ties=ties)
    correct = (pred == truth).astype(np.int64)
    top = counts.max(axis=1) if len(lab) else np.zeros(0, np.int64)
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    certainty = 1.0 - entropy / np.log(num_classes) if num_classes > 1 else np.ones(len(lab))
    which = np.clip(np.digitize(certainty, np.linspace(0.0, 1.0, 11)[1:-1]), 0, 9)
    return {"k": k, "top_n": np.bincount(top, minlength=k + 1), "top_correct": _count(top, correct, k + 1),
            "certainty_n": np.bincount(which, minlength=10), "certainty_correct": _count(which, correct, 10)}


def calibration_from_counts(c: dict) -> dict:
    """:func:`calibration`'s figures from (merged) :func:`calibration_counts`."""
    k, n, right = int(c["k"]), np.asarray(c["top_n"]), np.asarray(c["top_correct"])
    by_count = {int(t): (float(right[t] / n[t]), int(n[t])) for t in np.flatnonzero(n)}
    width = -(-k // 10)  # ceil: at most 10 ranges of counts
    which_range = np.maximum(np.arange(k + 1) - 1, 0) // width
    range_n, range_right = np.bincount(which_range, weights=n), np.bincount(which_range, weights=right)
    count_bins = [(int(b * width + 1), int(min((b + 1) * width, k)), float(range_right[b] / range_n[b]),
                   int(range_n[b])) for b in np.flatnonzero(range_n)]
    cn, cr = np.asarray(c["certainty_n"]), np.asarray(c["certainty_correct"])
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(cn > 0, cr / np.maximum(cn, 1), np.nan)
    return {"count": by_count, "count_bins": count_bins, "certainty": (np.linspace(0.0, 1.0, 11), acc, cn)}


def _count(which, flags, size: int) -> np.ndarray:
    """``(size,)`` int64: how many of ``flags`` (0/1) are set in each bin of ``which``."""
    return np.bincount(which, weights=flags, minlength=size).astype(np.int64)


def distance_sums(sims, columns: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The additive half of :func:`mean_distance`: ``(units, n)``, each ``(min(columns, K),)`` int64: the
    cosine distances ``1 - s`` to the i-th neighbour summed in units of ``2**-DISTANCE_UNIT_BITS``, and
    how many were summed (padding, an infinite distance, is left out)."""
    s = np.asarray(sims)[:, :columns].astype(np.float64)
    d = 1.0 - s
    finite = np.isfinite(d)
    units = np.rint(np.ldexp(np.where(finite, d, 0.0), DISTANCE_UNIT_BITS)).astype(np.int64)
    return units.sum(axis=0), finite.sum(axis=0).astype(np.int64)


def mean_distance(units, n) -> np.ndarray:
    """The mean distance to the i-th neighbour from (merged) :func:`distance_sums` (NaN where nothing was summed)."""
    n = np.asarray(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, np.ldexp(np.asarray(units, dtype=np.float64), -DISTANCE_UNIT_BITS) / np.maximum(n, 1),
                        np.nan)


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

    Bin ``b`` holds the confidences in ``[b / bins, (b + 1) / bins)``, the last one also 1.0. Each
    bin's confidences are summed exactly (:func:`confidence_bins`), so the mean is the correctly
    rounded one, whatever the order of the queries.

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
    return reliability_from_bins(confidence_bins(confidence, correct, bins=bins))


def confidence_bins(confidence, correct, *, bins: int = 10) -> dict:
    """The additive half of :func:`reliability`: ``{"count", "correct", "units_hi", "units_lo"}``, each
    ``(bins,)`` int64, the bin's confidences summed in units of ``2**-CONFIDENCE_UNIT_BITS``
    (``units_hi * 2**31 + units_lo``). Any number of queries, none included."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)  # floor; 1.0 joins the last bin
    units = np.rint(np.ldexp(confidence, CONFIDENCE_UNIT_BITS)).astype(np.int64)
    hi, lo = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    np.add.at(hi, which, units >> _HALF)
    np.add.at(lo, which, units & ((1 << _HALF) - 1))
    return {"count": np.bincount(which, minlength=bins), "correct": _count(which, correct, bins),
            "units_hi": hi, "units_lo": lo}


def reliability_from_bins(b: dict) -> dict:
    """:func:`reliability`'s figures from (merged) :func:`confidence_bins`."""
    count = np.asarray(b["count"])
    total = int(count.sum())
    if total < 1:
        raise ValueError("the reliability diagram needs at least one confidence")
    sums = np.array([math.ldexp(float((int(h) << _HALF) + int(lo)), -CONFIDENCE_UNIT_BITS)
                     for h, lo in zip(b["units_hi"], b["units_lo"])])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = sums / count
        acc = np.asarray(b["correct"]) / count
    held = count > 0
    ece = float(np.sum(count[held] / total * np.abs(acc[held] - mean_conf[held])))
    return {"edges": np.linspace(0.0, 1.0, len(count) + 1), "count": count, "confidence": mean_conf,
            "accuracy": acc, "ece": ece}


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
    need = coverage_need(coverage, len(np.atleast_1d(confidence)))
    curve = risk_coverage(confidence, correct)
    i = int(np.searchsorted(curve["answered"], need))  # the first point answering >= need
    return {"target": float(coverage), "threshold": float(curve["threshold"][i]),
            "coverage": float(curve["coverage"][i]), "accuracy": float(curve["accuracy"][i]),
            "answered": int(curve["answered"][i])}


def coverage_need(coverage: float, total: int) -> int:
    """How many of ``total`` queries a coverage of ``coverage`` answers at least: ``ceil(coverage * total)``."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    return int(np.ceil(coverage * total - 1e-9))


def coverage_histogram(confidence, correct, *, bins: int = CURVE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """The additive half of :func:`coverage_curve`: ``(n, right)``, ``(bins,)`` int64, queries and right
    answers per equal-width confidence bin (as :func:`reliability` bins them)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    return np.bincount(which, minlength=bins), _count(which, np.asarray(correct, dtype=bool), bins)


def coverage_curve(n, right) -> dict:
    """:func:`risk_coverage` at the resolution of :func:`coverage_histogram`'s bins (for plots): one point
    per non-empty bin, highest first, answering every query of that bin and above.

    Returns:
        ``{"threshold": (G,) the bins' lower edges, descending, "coverage", "accuracy", "answered"}``.
    """
    n, right = np.asarray(n)[::-1], np.asarray(right)[::-1]
    answered, got = np.cumsum(n), np.cumsum(right)
    held = n > 0
    total = max(int(answered[-1]) if len(answered) else 0, 1)
    lower = np.arange(len(n))[::-1] / len(n)
    return {"threshold": lower[held], "coverage": answered[held] / total,
            "accuracy": got[held] / np.maximum(answered[held], 1), "answered": answered[held]}
