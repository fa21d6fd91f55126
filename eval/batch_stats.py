"""What one batch of queries adds to an evaluation: additive statistics, their merge, and the figures made from them.

A batch's neighbour lists (at k-max) become integer counts that add up across batches, so that an
evaluation can stream its queries and still report exactly what one pass over every query at once
would (``eval.evaluate`` is that pass, and the oracle):

- ``correct`` ``(C, K)``: right predictions of every voting rule at every hyper-parameter value of
  the sweep (``CONFIGS``, C = 18) at every k, and ``correct_tune``, the same over the queries of
  the held-out choice's tuning half (:func:`held_out_tune`: a hash of the query id, so every batch
  agrees on it); the test half's counts are the difference;
- ``hits`` and ``rank_correct`` ``(K,)``: queries whose label is among the first k neighbours', and
  whose i-th neighbour alone is right;
- the plurality-count calibration counts (``eval.metrics.calibration_counts``);
- distances to the first 100 neighbours summed exactly (``eval.metrics.distance_sums``), for the
  in-distribution queries and, separately, the out-of-distribution ones;
- ``n`` and ``n_tune``: labelled queries, and those in the tuning half.

Every figure is the count over the number of queries, one float division, as a mean over an
in-process array is. The confidence figures need each rule's best k, known only once every batch
is in: ``eval.streamed`` makes them in a second pass over the kept neighbour lists.
"""
from __future__ import annotations

import hashlib

import numpy as np

from eval import metrics
from memory import voting

SWEEPS = {
    "rank": ("alpha", (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)),
    "softmax": ("tau", (0.01, 0.03, 0.07, 0.1, 0.3, 1.0)),
    "distance": ("xi", (0.5, 1.0, 2.0, 4.0, 8.0)),
    "plurality": (None, (None,)),
}
DEFAULTS = {"alpha": 2.0, "tau": 0.07, "xi": 1.0}
CONFIGS = tuple((method, value) for method, (_, values) in SWEEPS.items() for value in values)
DISTANCE_COLUMNS = 100  # the distance figure's neighbours
CALIBRATION_K = 100  # the plurality-count calibration's neighbours


def params(method: str, value) -> dict:
    """The voting keyword arguments of one sweep point: the defaults, with the rule's own parameter set."""
    kw = dict(DEFAULTS)
    param = SWEEPS[method][0]
    if param:
        kw[param] = value
    return kw


def held_out_tune(ids, seed: int) -> np.ndarray:
    """``(Q,)`` bool: which queries the held-out choice tunes on (the others test it).

    A function of each query's id and the seed alone (the first bit of a BLAKE2b hash of both), so
    that batches, reruns and the in-process evaluation agree on it whatever order the queries come in.
    """
    key = f"vismem-held-out:{int(seed)}:".encode()
    return np.fromiter((hashlib.blake2b(key + str(i).encode(), digest_size=1).digest()[0] < 128 for i in ids),
                       dtype=bool, count=len(ids))


def query_stats(labels, sims, weights, truth, tune, *, num_classes: int, ties: str = "nearest") -> dict:
    """The additive statistics of one batch of labelled queries (module docstring), from their neighbours.

    Args:
        labels, sims: ``(Q, K)`` neighbour labels and similarities at k-max, best first.
        weights: ``(Q, K)`` per-neighbour vote multipliers, or None.
        truth: ``(Q,)`` the queries' labels; tune: ``(Q,)`` bool, :func:`held_out_tune`.
    """
    labels, truth, tune = np.asarray(labels), np.asarray(truth), np.asarray(tune, dtype=bool)
    q, k_max = labels.shape
    correct = np.zeros((len(CONFIGS), k_max), np.int64)
    correct_tune = np.zeros_like(correct)
    for i, (method, value) in enumerate(CONFIGS):
        pred = voting.predict_all_k(labels, sims, method=method, num_classes=num_classes, weights=weights, ties=ties,
                                    **params(method, value))
        right = pred == truth[:, None]
        correct[i], correct_tune[i] = right.sum(axis=0), right[tune].sum(axis=0)
    same = labels == truth[:, None]
    cal = metrics.calibration_counts(labels, truth, num_classes=num_classes, k=CALIBRATION_K, ties=ties)
    units, counted = metrics.distance_sums(sims, DISTANCE_COLUMNS)
    return {"n": np.int64(q), "n_tune": np.int64(tune.sum()), "correct": correct, "correct_tune": correct_tune,
            "hits": (np.cumsum(same, axis=1) > 0).sum(axis=0), "rank_correct": same.sum(axis=0),
            "cal_k": np.int64(cal["k"]), "top_n": cal["top_n"], "top_correct": cal["top_correct"],
            "certainty_n": cal["certainty_n"], "certainty_correct": cal["certainty_correct"],
            "dist_units": units, "dist_n": counted}


def ood_stats(sims) -> dict:
    """The additive statistics of one batch of out-of-distribution queries: their distance sums."""
    units, counted = metrics.distance_sums(sims, DISTANCE_COLUMNS)
    return {"ood_n": np.int64(len(sims)), "ood_dist_units": units, "ood_dist_n": counted}


def merge(total: dict | None, part: dict) -> dict:
    """``total + part``, key by key (a key only one of them has is kept as it is)."""
    if total is None:
        return {k: np.array(v, copy=True) for k, v in part.items()}
    out = dict(total)
    for key, value in part.items():
        if key == "cal_k":
            if key in out and int(out[key]) != int(value):
                raise ValueError(f"batches disagree on the calibration's k: {int(out[key])} and {int(value)}")
            out[key] = value
        else:
            out[key] = out[key] + value if key in out else np.array(value, copy=True)
    return out


def choose(tuned: dict) -> dict:
    """``{method: (value, k, tune accuracy)}``: the sweep point and k with the best tuning accuracy
    (``tuned``: ``{method: {value: accuracy (K,)}}``; the first value, then the smallest k, on ties)."""
    out = {}
    for method, by_value in tuned.items():
        value, acc = max(by_value.items(), key=lambda kv: kv[1].max())
        out[method] = (value, int(acc.argmax()) + 1, float(acc.max()))
    return out


def honest_record(method: str, value, k: int, tune_accuracy: float, test_accuracy: float, tune_n: int,
                  test_n: int) -> dict:
    """One rule's held-out choice as the report and ``metrics.jsonl`` carry it."""
    return {"k": k, "param": SWEEPS[method][0], "value": value, "tune_accuracy": tune_accuracy,
            "test_accuracy": float(test_accuracy), "tune_n": int(tune_n), "test_n": int(test_n)}


def check_split(tune_n: int, test_n: int, seed: int) -> None:
    """Refuse a held-out split with an empty half (a handful of queries can hash all one way)."""
    if tune_n == 0 or test_n == 0:
        raise ValueError(f"the held-out choice needs labelled queries in both halves of its split: of "
                         f"{tune_n + test_n} labelled queries, {tune_n} fell in the tuning half (seed {seed}); "
                         "evaluate more queries, or another --seed")


def sweeps_from(correct, n) -> dict:
    """``{method: {value: accuracy (K,)}}`` from ``(C, K)`` counts over ``n`` queries."""
    out = {method: {} for method in SWEEPS}
    for (method, value), row in zip(CONFIGS, np.asarray(correct)):
        out[method][value] = row / n
    return out


def honest_from(stats: dict, seed: int) -> dict:
    """The held-out choice (as ``eval.evaluate.honest_choice`` makes it) from merged statistics."""
    n, n_tune = int(stats["n"]), int(stats["n_tune"])
    check_split(n_tune, n - n_tune, seed)
    test = stats["correct"] - stats["correct_tune"]
    out = {}
    for method, (value, k, tune_acc) in choose(sweeps_from(stats["correct_tune"], n_tune)).items():
        row = CONFIGS.index((method, value))
        out[method] = honest_record(method, value, k, tune_acc, test[row, k - 1] / (n - n_tune), n_tune, n - n_tune)
    return out
