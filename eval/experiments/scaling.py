"""Memory-size scaling (sections 3.2-3.3, Appendix E): error against nested random subsets, and the fit."""
from __future__ import annotations

import numpy as np

from eval import scaling
from eval.experiments.common import Split, neighbours, table
from memory import voting


def nested_sizes(n_total: int, num_classes: int, steps: int = 6) -> list:
    """From one item per class to all, log-spaced (sizes must exceed 10 for the law)."""
    lo = max(num_classes, 11)
    return sorted({int(round(s)) for s in np.geomspace(lo, n_total, steps)})


def run(memory: Split, queries: Split, class_names, *, k: int = 10, method: str = "rank", seed: int = 0,
        sizes=None, label: str = "encoder") -> dict:
    """Error (%) of ``method`` at ``k`` for nested subsets of ``memory``; fit of the Appendix E law.

    Subsets are nested (each contains the previous) and start with one item per class.
    """
    rng = np.random.default_rng(seed)
    num_classes = len(class_names)
    first = [rng.choice(np.flatnonzero(memory.labels == c)) for c in range(num_classes)
             if (memory.labels == c).any()]
    rest = rng.permutation(np.setdiff1d(np.arange(len(memory)), first))
    order = np.concatenate([first, rest]).astype(np.int64)
    sizes = sizes or nested_sizes(len(memory), num_classes)
    errors = []
    for m in sizes:
        nb = neighbours(memory.take(order[:m]), queries.embeddings, k, class_names)
        pred = voting.predict(nb.labels, nb.sims, method=method, num_classes=num_classes, k=min(k, m))
        errors.append(100.0 * float((pred != queries.labels).mean()))
    fit_sizes = [s for s, e in zip(sizes, errors) if e > 0]
    fit_errors = [e for e in errors if e > 0]
    lines = [f"## Memory-size scaling ({label}; Appendix E)", "",
             f"Top-1 error of {method} voting at k = {k} on nested random subsets of the memory:", ""]
    figures = {"sizes": sizes, "error_percent": errors}
    if len(fit_sizes) < 2:
        lines += table(["memory size M", "error %"], [[s, f"{e:.2f}"] for s, e in zip(sizes, errors)])
        lines += ["", f"No fit: the error is zero at {len(sizes) - len(fit_sizes)} of {len(sizes)} sizes, and the "
                  "law needs two or more non-zero errors.", ""]
        return {"figures": {**figures, "a": None, "b": None}, "report": "\n".join(lines)}
    a, b = scaling.fit_scaling_law(fit_sizes, fit_errors)
    gof = scaling.goodness_of_fit(fit_sizes, fit_errors, a, b)
    extrapolate = [10 * sizes[-1], 100 * sizes[-1], 10 ** 9]
    predicted = scaling.predict_error(extrapolate, a, b)
    rows = [[s, f"{e:.2f}", f"{scaling.predict_error([s], a, b)[0]:.2f}"] for s, e in zip(sizes, errors)]
    lines += table(["memory size M", "error %", "fit %"], rows)
    lines += ["", f"Fit `log10(e) = {a:.4f} * log10(log10(M)) + {b:.4f}` over the non-zero errors; R^2 (log space) "
              f"{gof['r2_log']:.4f}, largest deviation {gof['max_abs_error_points']:.2f} points. Extrapolated error: "
              + ", ".join(f"{p:.2f}% at M = {m:.0e}" for m, p in zip(extrapolate, predicted))
              + ". Paper (DINOv2 ViT-L/14): a = -0.9434, b = 2.0704.", ""]
    return {"figures": {**figures, "a": a, "b": b, **gof,
                        "extrapolation": dict(zip(map(int, extrapolate), predicted.tolist()))},
            "report": "\n".join(lines)}
