"""How far each voting rule's confidence can be trusted, and what abstaining buys, at its best k.

Confidence is the voted class's share of the vote (``memory.confidence``), as ``vismem query`` and
the server report it. For each rule at the k where it is most accurate on the evaluation set (its
default hyper-parameters, as in the evaluation's "for comparison" table), from the same neighbour
lists: the reliability diagram in 10 equal-width confidence bins with its expected calibration
error, and the risk-coverage curve (queries answered most confident first) with the accuracy at
each tenth of coverage, 90% the headline (``eval.metrics``). A streamed evaluation (``eval.streamed``)
makes the same :func:`figure` from counts added up batch by batch and exact order statistics
(``eval.selection``).
"""
from __future__ import annotations

import numpy as np

from eval import metrics
from memory import confidence, voting

COVERAGES = tuple(c / 10 for c in range(1, 11))
HEADLINE = 0.9  # the coverage the report and the demo state


def confidence_figures(labels, sims, truth, *, num_classes: int, best: dict, weights=None, ties: str = "nearest",
                       alpha: float = 2.0, tau: float = 0.07, xi: float = 1.0) -> dict:
    """``{method: {"k", "accuracy", "reliability", "risk_coverage", "at_coverage"}}`` for each rule of
    ``best`` (``{method: {"k": ...}}``) at its k: :func:`figure` from every query's confidence at once.
    ``at_coverage`` holds one :func:`eval.metrics.accuracy_at_coverage` per entry of :data:`COVERAGES`;
    ``risk_coverage`` is the curve at 1/1000 confidence resolution (:func:`eval.metrics.coverage_curve`)."""
    out = {}
    for method, chosen in best.items():
        k = int(chosen["k"])
        conf, correct = confidence_at_k(labels, sims, truth, method=method, k=k, num_classes=num_classes,
                                        weights=weights, ties=ties, alpha=alpha, tau=tau, xi=xi)
        out[method] = figure(k, metrics.confidence_bins(conf, correct), metrics.coverage_histogram(conf, correct),
                             [metrics.accuracy_at_coverage(conf, correct, c) for c in COVERAGES])
    return out


def confidence_at_k(labels, sims, truth, *, method: str, k: int, num_classes: int, weights=None,
                    ties: str = "nearest", alpha: float = 2.0, tau: float = 0.07, xi: float = 1.0):
    """``(confidence, correct)``, ``(Q,)`` each: every query's confidence in ``method``'s vote at ``k``, as
    ``Memory.classify`` gives it, and whether that vote is right."""
    scores, preds = voting.vote_and_predict(labels, sims, method=method, num_classes=num_classes, k=k,
                                            weights=weights, alpha=alpha, tau=tau, xi=xi, ties=ties)
    return confidence.confidence(scores, preds), preds == np.asarray(truth)


def figure(k: int, bins: dict, curve_histogram: tuple, at_coverage: list) -> dict:
    """One rule's confidence figures from (merged) :func:`eval.metrics.confidence_bins`,
    :func:`eval.metrics.coverage_histogram` and its points at :data:`COVERAGES`."""
    count = np.asarray(bins["count"])
    return {"k": int(k), "accuracy": int(np.sum(bins["correct"])) / int(count.sum()),
            "reliability": metrics.reliability_from_bins(bins),
            "risk_coverage": metrics.coverage_curve(*curve_histogram), "at_coverage": at_coverage}


def headline(fig: dict) -> dict:
    """The :data:`HEADLINE` coverage point of one rule's figures."""
    return next(p for p in fig["at_coverage"] if p["target"] == HEADLINE)


def summary(figures: dict) -> dict:
    """``{method: {k, ece, accuracy, accuracy_at_90_coverage, coverage_at_90, threshold_at_90}}``."""
    out = {}
    for method, f in figures.items():
        h = headline(f)
        out[method] = {"k": f["k"], "ece": f["reliability"]["ece"], "accuracy": f["accuracy"],
                       "accuracy_at_90_coverage": h["accuracy"], "coverage_at_90": h["coverage"],
                       "threshold_at_90": h["threshold"]}
    return out


def records(figures: dict) -> list:
    """The rows of ``metrics.jsonl``: every bin of every reliability diagram (null for an empty bin's
    mean confidence and accuracy), each rule's ECE, and its accuracy at each tenth of coverage."""
    rows = []
    for method, f in figures.items():
        r = f["reliability"]
        edges = r["edges"]
        for b, n in enumerate(r["count"]):
            rows.append({"figure": "reliability_diagram", "method": method, "k": f["k"], "bin": b,
                         "lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(n),
                         "mean_confidence": float(r["confidence"][b]) if n else None,
                         "accuracy": float(r["accuracy"][b]) if n else None})
        rows.append({"figure": "expected_calibration_error", "method": method, "k": f["k"], "ece": r["ece"]})
        rows += [{"figure": "risk_coverage", "method": method, "k": f["k"], **p} for p in f["at_coverage"]]
    return rows


def report_lines(figures: dict) -> list:
    """The report's section: a summary per rule, the reliability diagrams, the risk-coverage table."""
    lines = ["## Confidence: calibration and abstention", "",
             "Confidence is the voted class's share of the vote (what `vismem query` and the server report); each "
             "rule at its best k on the evaluation set, default hyper-parameters. A calibrated rule is right as "
             "often as it is confident (expected calibration error, ECE, near 0). Abstaining below a confidence "
             "threshold (`--abstain-below`) trades coverage for accuracy: the accuracy at 90% coverage answers the "
             "90% most confident queries (queries of equal confidence together, so a little more when tied).", "",
             "| rule | k | ECE | accuracy (all) | **accuracy at 90% coverage** | coverage | abstain below |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, s in summary(figures).items():
        lines.append(f"| {method} | {s['k']} | {s['ece']:.4f} | {s['accuracy']:.4f} | "
                     f"**{s['accuracy_at_90_coverage']:.4f}** | {s['coverage_at_90']:.4f} | "
                     f"{s['threshold_at_90']:.4f} |")
    for method, f in figures.items():
        r = f["reliability"]
        lines += ["", f"Reliability diagram, {method} voting at k = {f['k']} (ECE {r['ece']:.4f}):", "",
                  "| confidence | queries | mean confidence | accuracy |", "| --- | --- | --- | --- |"]
        for b, n in enumerate(r["count"]):
            span = f"[{r['edges'][b]:.1f}, {r['edges'][b + 1]:.1f}{']' if b == len(r['count']) - 1 else ')'}"
            lines.append(f"| {span} | {n} | {r['confidence'][b]:.4f} | {r['accuracy'][b]:.4f} |" if n
                         else f"| {span} | 0 | - | - |")
    lines += ["", "Risk-coverage: accuracy of the answered queries (most confident first) at each coverage, "
              "with the confidence threshold that answers them:", "",
              "| coverage | " + " | ".join(figures) + " |", "| --- |" + " --- |" * len(figures)]
    for i, target in enumerate(COVERAGES):
        cells = [f"{f['at_coverage'][i]['accuracy']:.4f} (>= {f['at_coverage'][i]['threshold']:.4f})"
                 for f in figures.values()]
        lines.append(f"| {100 * target:.0f}% | " + " | ".join(cells) + " |")
    return lines + [""]
