"""Exact points of a risk-coverage curve over confidences that arrive in batches, in bounded memory.

The accuracy at a coverage (:func:`eval.metrics.accuracy_at_coverage`) answers the ``need`` most
confident queries and every query tied with the last of them: its threshold is the ``need``-th
largest confidence, an order statistic. Held whole, the confidences make one sort; streamed, they
are selected by radix: a non-negative float64's bit pattern, read as an unsigned integer, orders as
the float does, so four passes over the batches, each counting one 16-bit digit of the patterns
that share the digits already fixed, pin the ``need``-th largest pattern exactly. The counts above
it (and the right answers among them) are added up on the way, so the point comes out with the same
integers, hence the same floats, as the sort. Memory: two 65,536-bin histograms per distinct prefix
being refined (at most one per coverage point), whatever the number of queries.
"""
from __future__ import annotations

import numpy as np

from eval import metrics

_DIGIT_BITS = 16
_LEVELS = 64 // _DIGIT_BITS
_BINS = 1 << _DIGIT_BITS


def coverage_points(chunks, coverages) -> list[dict]:
    """:func:`eval.metrics.accuracy_at_coverage` at each of ``coverages``, from streamed confidences.

    Args:
        chunks: a callable returning an iterable of ``(confidence, correct)`` array pairs, one per
            batch (confidences in [0, 1]); it is called once per pass (five passes).
        coverages: the coverages wanted, each in (0, 1].

    Returns:
        one ``{"target", "threshold", "coverage", "accuracy", "answered"}`` per coverage, equal to
        :func:`eval.metrics.accuracy_at_coverage` over all the confidences at once.

    Raises:
        ValueError: no confidences, a confidence outside [0, 1], a coverage outside (0, 1].
    """
    total = 0
    for conf, _ in chunks():
        conf = np.asarray(conf, dtype=np.float64)
        if len(conf) and not np.all((conf >= 0) & (conf <= 1)):
            raise ValueError("confidences must lie in [0, 1]")
        total += len(conf)
    if total < 1:
        raise ValueError("no confidences: nothing to select from")
    targets = [{"target": float(c), "need": metrics.coverage_need(c, total), "prefix": 0, "above_n": 0,
                "above_right": 0} for c in coverages]
    for level in range(_LEVELS):
        shift = 64 - _DIGIT_BITS * (level + 1)
        hist = {t["prefix"]: (np.zeros(_BINS, np.int64), np.zeros(_BINS, np.int64)) for t in targets}
        for conf, correct in chunks():
            keys = _keys(conf)
            right = np.asarray(correct, dtype=bool)
            digit = ((keys >> np.uint64(shift)) & np.uint64(_BINS - 1)).astype(np.int64)
            high = keys >> np.uint64(shift + _DIGIT_BITS) if level else None
            for prefix, (n, r) in hist.items():
                sel = slice(None) if level == 0 else high == np.uint64(prefix)
                n += np.bincount(digit[sel], minlength=_BINS)
                r += np.bincount(digit[sel], weights=right[sel], minlength=_BINS).astype(np.int64)
        for t in targets:
            n, r = hist[t["prefix"]]
            # Digits from the largest down: the first whose running count reaches the need holds the value.
            reached = t["above_n"] + np.cumsum(n[::-1])
            d = _BINS - 1 - int(np.searchsorted(reached, t["need"]))
            t["above_n"] += int(n[d + 1:].sum())
            t["above_right"] += int(r[d + 1:].sum())
            t["prefix"] = (t["prefix"] << _DIGIT_BITS) | d
            t["equal"] = (int(n[d]), int(r[d]))
    out = []
    for t in targets:
        answered = t["above_n"] + t["equal"][0]
        right = t["above_right"] + t["equal"][1]
        out.append({"target": t["target"], "threshold": float(np.array(t["prefix"], np.uint64).view(np.float64)),
                    "coverage": answered / total, "accuracy": right / answered, "answered": answered})
    return out


def _keys(conf) -> np.ndarray:
    """The bit patterns of non-negative float64 confidences (``-0.0`` made ``0.0``), ordered as the floats."""
    return (np.asarray(conf, dtype=np.float64) + 0.0).view(np.uint64)
