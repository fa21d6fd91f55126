"""How sure a vote is (the winning class's share of it), and abstaining when that share is too small.

Confidence is the predicted class's score over the sum of every class's score, under the voting rule
and tie rule that made the prediction: 1 when every vote went to that class, at most 1/n for an n-way
tie, and 0 when nothing voted (no valid neighbour, or every weight 0). Under softmax voting it is the
class's softmax probability (the scores' per-query factor cancels).
"""
from __future__ import annotations

import math

import numpy as np

ABSTAINED = "abstained"  # confidence below the caller's abstain_below: prediction -1
NO_VOTES = "no votes"    # no valid neighbour, or only zero weights: prediction -1 whatever the threshold


def confidence(scores, predictions) -> np.ndarray:
    """``(Q,)`` float64: ``scores[i, predictions[i]] / scores[i].sum()``; 0 where the prediction is -1 or
    the scores sum to 0.

    Example:
        >>> confidence([[1.0, 3.0, 0.0]], [1]).tolist()
        [0.75]
    """
    scores = np.asarray(scores, dtype=np.float64)
    predictions = np.asarray(predictions)
    if scores.ndim != 2 or predictions.shape != (len(scores),):
        raise ValueError(f"scores must be (Q, C) and predictions (Q,), got {scores.shape} and {predictions.shape}")
    total = scores.sum(axis=1)
    won = np.take_along_axis(scores, np.maximum(predictions, 0)[:, None], axis=1)[:, 0]
    ok = (predictions >= 0) & (total > 0)
    return np.where(ok, won / np.where(ok, total, 1.0), 0.0)


def check_abstain_below(value) -> float | None:
    """``value`` as a float when it is None or a number in [0, 1]; a ValueError that says why otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"abstain_below must be a number in [0, 1] (a confidence: the winning class's share of "
                         f"the vote), got {value!r}")
    return float(value)


def abstain(predictions, conf, abstain_below: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``(predictions, reasons)``: predictions whose confidence is below ``abstain_below`` become -1.

    ``reasons`` is ``(Q,)`` object: None for an answer, :data:`ABSTAINED`, or :data:`NO_VOTES` (the
    vote itself gave -1). With ``abstain_below=None`` nothing abstains.
    """
    threshold = check_abstain_below(abstain_below)
    predictions = np.asarray(predictions)
    reasons = np.full(len(predictions), None, dtype=object)
    reasons[predictions < 0] = NO_VOTES
    if threshold is None:
        return predictions, reasons
    below = (predictions >= 0) & (np.asarray(conf) < threshold)
    reasons[below] = ABSTAINED
    return np.where(below, -1, predictions), reasons
