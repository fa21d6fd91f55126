"""Voting rules that turn a query's ranked neighbours into class scores and a prediction.

Formulas (DESIGN.md, the paper's section 2.2), with rank ``r`` 0-based and ``s`` the cosine similarity:

- ``plurality``: ``w = 1``
- ``distance``:  ``w = exp(-(1 - s)) ** xi``
- ``softmax``:   ``w = exp(s / tau)`` (computed as ``exp((s - s_max) / tau)`` per query: the same
  scores up to a per-query factor, so the same argmax, and no overflow for small ``tau``)
- ``rank``:      ``w = 1 / (alpha + r)``

Each weight is multiplied by an optional per-neighbour ``weights`` entry (soft memory pruning).
Neighbours whose label is ``-1`` (excluded: hard-pruned, removed, or padding) are skipped, and the
neighbours after them move up in rank, exactly as if the excluded items were not in the memory; each
kept neighbour keeps its own similarity and weight (the released notebook reads those of the neighbour
at the kept rank's position: a bug, not copied).

Ties between classes, two documented rules (``ties``):

- ``nearest`` (the default): the tied class whose best-ranked neighbour is nearest wins.
- ``leader`` (the authors' released code, for reproducing the paper's figures): scanning the
  neighbours in rank order with running class scores, the leader changes only when another class
  becomes strictly greater (beyond the float tolerance) than it, so the class that first reached
  the top score keeps it. Both rules pick the same class whenever the top score is not tied.

A query with no valid neighbour predicts ``-1``.

Everything is vectorised over the batch; :func:`predict_all_k` gives the prediction for every
``k = 1..K`` in one pass over the columns, because evaluations need every k.
"""
from __future__ import annotations

import numpy as np

METHODS = ("plurality", "distance", "softmax", "rank")
TIES = ("nearest", "leader")
EXCLUDED = -1
# Class scores within this relative distance of the best one count as tied: sums of the same
# weights in another order can differ in the last bits.
_TIE_RTOL = 1e-9


def _validate(labels, sims, weights, method, num_classes, k):
    labels = np.asarray(labels)
    sims = np.asarray(sims, dtype=np.float64)
    if method not in METHODS:
        raise ValueError(f"unknown voting method {method!r}; choose one of {', '.join(METHODS)}")
    if labels.ndim != 2:
        raise ValueError(f"labels must be a (queries, neighbours) array, got shape {labels.shape}")
    if sims.shape != labels.shape:
        raise ValueError(f"sims shape {sims.shape} does not match labels shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.size and (labels.min() < EXCLUDED or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or be {EXCLUDED} (excluded); "
            f"got values in [{labels.min()}, {labels.max()}]"
        )
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != labels.shape:
            raise ValueError(f"weights shape {weights.shape} does not match labels shape {labels.shape}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError("weights must be finite and non-negative")
    if k is not None:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if int(k) > labels.shape[1]:
            raise ValueError(f"k={k} exceeds the {labels.shape[1]} neighbours given")
    return labels.astype(np.int64), sims, weights


def check_ties(ties) -> str:
    """``ties`` if it names a tie rule; a ValueError listing the rules otherwise."""
    if ties not in TIES:
        raise ValueError(f"unknown tie rule {ties!r}; choose one of {', '.join(TIES)} (nearest: the tied class "
                         "with the nearest neighbour wins; leader: the tied class that reached the top score first)")
    return ties


def _compact(labels, sims, weights):
    """Move excluded neighbours to the end of each row, keeping the order of the others."""
    order = np.argsort(labels == EXCLUDED, axis=1, kind="stable")
    labels = np.take_along_axis(labels, order, axis=1)
    sims = np.take_along_axis(sims, order, axis=1)
    if weights is not None:
        weights = np.take_along_axis(weights, order, axis=1)
    return labels, sims, weights


def neighbour_weights(labels, sims, *, method, weights=None, alpha=2.0, tau=0.07, xi=1.0):
    """Per-neighbour vote weights ``(Q, K)`` for already-compacted neighbour lists (0 where excluded)."""
    valid = labels != EXCLUDED
    if method == "plurality":
        w = np.ones(labels.shape, dtype=np.float64)
    elif method == "distance":
        w = np.exp(-(1.0 - sims) * xi)
    elif method == "softmax":
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        best = np.where(valid, sims, -np.inf).max(axis=1, keepdims=True) if sims.size else sims
        best = np.where(np.isfinite(best), best, 0.0)
        w = np.exp((np.where(valid, sims, best) - best) / tau)
    elif method == "rank":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0 (it offsets the 0-based rank), got {alpha}")
        w = np.broadcast_to(1.0 / (alpha + np.arange(labels.shape[1], dtype=np.float64)), labels.shape)
    else:
        raise ValueError(f"unknown voting method {method!r}; choose one of {', '.join(METHODS)}")
    if weights is not None:
        w = w * weights
    return np.where(valid, w, 0.0)


def _scores_and_first_rank(labels, w, num_classes):
    q, k = labels.shape
    valid = labels != EXCLUDED
    rows = np.repeat(np.arange(q), k)
    cols = np.where(valid, labels, 0).ravel()
    scores = np.zeros((q, num_classes), dtype=np.float64)
    np.add.at(scores, (rows, cols), w.ravel())
    # Best (lowest) rank of each class among the neighbours; k means "absent".
    first_rank = np.full((q, num_classes), k, dtype=np.int64)
    ranks = np.broadcast_to(np.arange(k), (q, k))
    np.minimum.at(first_rank, (rows[valid.ravel()], cols[valid.ravel()]), ranks[valid])
    return scores, first_rank


def _argmax_with_ties(scores, first_rank, absent_rank):
    best = scores.max(axis=1, keepdims=True)
    tied = np.isclose(scores, best, rtol=_TIE_RTOL, atol=0.0) & (first_rank < absent_rank)
    pred = np.argmin(np.where(tied, first_rank, absent_rank + 1), axis=1)
    return np.where(tied.any(axis=1), pred, EXCLUDED)


def _prepare(labels, sims, method, num_classes, k, weights, alpha, tau, xi):
    labels, sims, weights = _validate(labels, sims, weights, method, num_classes, k)
    labels, sims, weights = _compact(labels, sims, weights)
    if k is not None:
        labels, sims = labels[:, :k], sims[:, :k]
        weights = None if weights is None else weights[:, :k]
    w = neighbour_weights(labels, sims, method=method, weights=weights, alpha=alpha, tau=tau, xi=xi)
    return labels, w


def vote(labels, sims, *, method, num_classes, k=None, weights=None, alpha=2.0, tau=0.07, xi=1.0):
    """Class scores ``(Q, num_classes)`` from the first ``k`` valid neighbours of each query.

    Args:
        labels: ``(Q, K)`` int neighbour labels, best first; ``-1`` marks an excluded neighbour.
        sims: ``(Q, K)`` cosine similarities in the same order.
        method: one of ``plurality``, ``distance``, ``softmax``, ``rank``.
        num_classes: number of classes; labels must lie in ``[0, num_classes)``.
        k: how many valid neighbours vote (default: all given).
        weights: optional ``(Q, K)`` non-negative multipliers (soft memory pruning).
        alpha, tau, xi: the rank offset, softmax temperature and distance exponent.

    Raises:
        ValueError: unknown method, mismatched shapes, labels out of range, bad k or weights.

    Example:
        >>> vote([[2, 1, 1]], [[0.9, 0.8, 0.7]], method="plurality", num_classes=3)
        array([[0., 2., 1.]])
    """
    labels, w = _prepare(labels, sims, method, num_classes, k, weights, alpha, tau, xi)
    return _scores_and_first_rank(labels, w, int(num_classes))[0]


def vote_and_predict(labels, sims, *, method, num_classes, k=None, weights=None, alpha=2.0, tau=0.07, xi=1.0,
                     ties="nearest"):
    """``(scores (Q, C), predictions (Q,))`` in one pass: :func:`vote` and :func:`predict` together."""
    check_ties(ties)
    labels, w = _prepare(labels, sims, method, num_classes, k, weights, alpha, tau, xi)
    scores, first_rank = _scores_and_first_rank(labels, w, int(num_classes))
    if ties == "nearest":
        return scores, _argmax_with_ties(scores, first_rank, labels.shape[1])
    return scores, _running_leader(labels, w)


def predict(labels, sims, *, method, num_classes, k=None, weights=None, alpha=2.0, tau=0.07, xi=1.0,
            ties="nearest"):
    """Predicted labels ``(Q,)``: the argmax of :func:`vote`, a tie settled by the rule ``ties``."""
    return vote_and_predict(labels, sims, method=method, num_classes=num_classes, k=k, weights=weights,
                            alpha=alpha, tau=tau, xi=xi, ties=ties)[1]


def predict_all_k(labels, sims, *, method, num_classes, weights=None, alpha=2.0, tau=0.07, xi=1.0,
                  ties="nearest"):
    """Predictions for every ``k = 1..K`` at once: ``(Q, K)``, column ``k - 1`` is :func:`predict` at k.

    When a query has fewer than k valid neighbours, its prediction at k uses all it has.
    """
    return predict_all_k_methods(labels, sims, methods=(method,), num_classes=num_classes, weights=weights,
                                 alpha=alpha, tau=tau, xi=xi, ties=ties)[method]


def predict_all_k_methods(labels, sims, *, methods=METHODS, num_classes, weights=None, alpha=2.0, tau=0.07,
                          xi=1.0, ties="nearest") -> dict:
    """``{method: (Q, K) predictions at every k}``: :func:`predict_all_k` for several rules, sharing the set-up.

    One pass over the neighbour columns per rule with running class scores: after adding
    neighbour ``j`` only its class's score grew, so the leader either stays or becomes that class.
    That pass is the ``leader`` tie rule itself, and the ``nearest`` rule with one more test.
    Scores live in per-query slots, one per distinct label numbered by first appearance (at most
    K), rather than a ``(Q, num_classes)`` matrix: the pass stays in cache with thousands of
    classes, and the ``nearest`` tie rule (nearest first appearance wins) becomes "the lower slot wins".
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown voting method {method!r}; choose one of {', '.join(METHODS)}")
    check_ties(ties)
    labels, sims, weights = _validate(labels, sims, weights, methods[0] if methods else "rank", num_classes, None)
    if (labels == EXCLUDED).any():
        labels, sims, weights = _compact(labels, sims, weights)
    slot, slot_label = _first_appearance_slots(labels)
    columns = _slot_columns(labels, slot)
    out = {}
    for method in methods:
        w = neighbour_weights(labels, sims, method=method, weights=weights, alpha=alpha, tau=tau, xi=xi)
        leader = _leaders_all_k(*columns, np.ascontiguousarray(w.T), labels.shape, ties=ties)
        out[method] = np.take_along_axis(slot_label, leader, axis=1)
    return out


def _running_leader(labels, w):
    """``(Q,)`` the ``leader`` rule's class after all the (compacted) neighbours: the last step of the
    running pass of :func:`predict_all_k_methods`, so that both give the same answer at every k."""
    if labels.shape[1] == 0:
        return np.full(len(labels), EXCLUDED, dtype=np.int64)
    slot, slot_label = _first_appearance_slots(labels)
    leader = _leaders_all_k(*_slot_columns(labels, slot), np.ascontiguousarray(w.T), labels.shape,
                            ties="leader", last_only=True)
    return slot_label[np.arange(len(labels)), leader]


def _slot_columns(labels, slot):
    """``(valid, slot, flat index into a (Q * K) score array)``, column-major: each step reads one column."""
    valid_t = np.ascontiguousarray((labels != EXCLUDED).T)
    slot_t = np.ascontiguousarray(slot.T)
    flat_t = np.ascontiguousarray((slot + labels.shape[1] * np.arange(len(labels))[:, None]).T)
    return valid_t, slot_t, flat_t


def _first_appearance_slots(labels):
    """``(slot (Q, K), slot_label (Q, K + 1))``: each neighbour's slot, numbered by its label's first
    appearance, and each slot's label (the extra last slot, "no leader", is labelled -1)."""
    q, kmax = labels.shape
    # Stable sort (a group's first member is its first appearance); 16-bit keys sort by radix.
    keys = labels.astype(np.int16) if labels.size and labels.max() < np.iinfo(np.int16).max else labels
    order = np.argsort(keys, axis=1, kind="stable")  # stable: a group's first member is its first appearance
    sorted_labels = np.take_along_axis(labels, order, axis=1)
    new_group = np.ones((q, kmax), dtype=bool)
    new_group[:, 1:] = sorted_labels[:, 1:] != sorted_labels[:, :-1]
    is_first = np.empty_like(new_group)
    np.put_along_axis(is_first, order, new_group, axis=1)
    first_slot = np.cumsum(is_first, axis=1) - 1  # valid at first appearances
    # Every member takes its group's first member's slot.
    start = np.maximum.accumulate(np.where(new_group, np.arange(kmax), 0), axis=1)
    slot_sorted = np.take_along_axis(first_slot, np.take_along_axis(order, start, axis=1), axis=1)
    slot = np.empty((q, kmax), dtype=np.int64)
    np.put_along_axis(slot, order, slot_sorted, axis=1)
    slot_label = np.full((q, kmax + 1), EXCLUDED, dtype=np.int64)
    np.put_along_axis(slot_label, slot, labels, axis=1)
    return slot, slot_label


def _leaders_all_k(valid_t, slot_t, flat_t, w_t, shape, *, ties="nearest", last_only=False):
    """``(Q, K)`` leading slot after each neighbour column (``K`` before any valid neighbour); with
    ``last_only``, ``(Q,)`` after the last column. A loop over the K columns, vectorised over queries."""
    q, kmax = shape
    scores = np.zeros(q * kmax, dtype=np.float64)
    leader = np.full(q, kmax, dtype=np.int64)  # above every slot: "no leader yet", loses every tie
    lead_score = np.full(q, -1.0)  # below any score (weights are >= 0)
    out = None if last_only else np.empty((kmax, q), dtype=np.int64)
    tol, diff = np.empty(q), np.empty(q)
    for j in range(kmax):
        valid, c, idx = valid_t[j], slot_t[j], flat_t[j]
        cand = scores[idx]
        cand += w_t[j]  # w is 0 where invalid
        scores[idx] = cand
        np.abs(lead_score, out=tol)
        tol *= _TIE_RTOL
        np.subtract(cand, lead_score, out=diff)
        if ties == "leader":  # wins only when clearly ahead: a tie keeps the class that got there first
            wins = valid & (diff > tol)
        else:  # also wins a tie (within tol) with an earlier first appearance (lower slot)
            wins = valid & ((diff > tol) | ((diff >= -tol) & (c < leader)))
        np.copyto(lead_score, cand, where=wins | (valid & (c == leader)))  # also when the leader itself grew
        np.copyto(leader, c, where=wins)
        if out is not None:
            out[j] = leader
    return leader if last_only else out.T
