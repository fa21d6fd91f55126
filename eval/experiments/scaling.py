"""Memory-size scaling (sections 3.2-3.3, Appendix E): error against nested random subsets, and the fit."""
from __future__ import annotations

import numpy as np

from eval import scaling
from eval.experiments.common import Split, neighbours, table, tie_note
from memory import voting


def nested_sizes(n_total: int, num_classes: int, steps: int = 6) -> list:
    """From one item per class to all, log-spaced (sizes must exceed 10 for the law)."""
    lo = max(num_classes, 11)
    return sorted({int(round(s)) for s in np.geomspace(lo, n_total, steps)})


def run(memory: Split, queries: Split, class_names, *, k: int = 10, method: str = "rank", seed: int = 0,
        sizes=None, label: str = "encoder", ties: str = "nearest") -> dict:
    """Error (%) of ``method`` at ``k`` for nested subsets of ``memory``; fit of the Appendix E law.

    Subsets are nested (each contains the previous) and start with one item per class; ``ties``
    settles tied votes (``memory.voting.TIES``).
    """
    note = tie_note(ties)
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
        pred = voting.predict(nb.labels, nb.sims, method=method, num_classes=num_classes, k=min(k, m), ties=ties)
        errors.append(100.0 * float((pred != queries.labels).mean()))
    fit_sizes = [s for s, e in zip(sizes, errors) if e > 0]
    fit_errors = [e for e in errors if e > 0]
    lines = [f"## Memory-size scaling ({label}; Appendix E)", "",
             f"Top-1 error of {method} voting at k = {k}{note} on nested random subsets of the memory:", ""]
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
              + ". Paper (DINOv2 ViT-L/14): a = {}, b = {}.".format(*scaling.PAPER_FITS["dinov2-vit-l14"]), ""]
    return {"figures": {**figures, "a": a, "b": b, **gof,
                        "extrapolation": dict(zip(map(int, extrapolate), predicted.tolist()))},
            "report": "\n".join(lines)}


def compare_encoders(series: dict, class_names, *, k: int = 10, method: str = "rank", seed: int = 0,
                     steps: int = 6, ties: str = "nearest") -> dict:
    """The compute-memory trade-off (section 3.3): the scaling curve of each encoder on the same images.

    Args:
        series: ``{label: (memory Split, queries Split, cost)}``, one per encoder, with the memories
            holding the same images in the same order (same ids); ``cost`` is a dict such as
            ``{"params_m": 4.7, "images_per_s": 250}`` or None.

    Every encoder sees the same nested subsets (same seed, same sizes). For each cheaper encoder the
    report states the memory size its own fit needs to match each stronger encoder's error at the
    full size: an extrapolation when beyond the measured sizes, and said so.
    """
    if len(series) < 2:
        raise ValueError(f"comparing encoders needs two or more series, got {len(series)}")
    series, n_items, n_queries = _aligned(series)
    sizes = nested_sizes(n_items, len(class_names), steps)
    runs = {name: run(mem, q, class_names, k=k, method=method, seed=seed, sizes=sizes, label=name,
                      ties=ties)["figures"]
            for name, (mem, q, _) in series.items()}
    costs = {name: dict(cost or {}) for name, (_, _, cost) in series.items()}
    full_error = {name: runs[name]["error_percent"][-1] for name in series}
    order = sorted(series, key=lambda n: -full_error[n])  # weakest first
    header = ["encoder", "params (M)", "images/s (encoder alone)", *(f"M = {m}" for m in sizes), "a", "b", "R^2"]
    lines = ["## Memory-size scaling by encoder (compute against memory, section 3.3)", "",
             f"Top-1 error (%) of {method} voting at k = {k}{tie_note(ties)} on the same nested random subsets of "
             "the same images, "
             f"embedded by each encoder ({n_items} memory items and {n_queries} queries that every encoder embedded); "
             "fit `log10(e) = a * log10(log10(M)) + b` per encoder:", ""]
    lines += table(header, [_encoder_row(name, runs[name], costs[name]) for name in order])
    trade, trade_lines = _trade_off(order, runs, full_error, sizes)
    lines += trade_lines + [""]
    figures = {"sizes": sizes, "items": n_items, "queries": n_queries, "encoders": runs, "costs": costs,
               "trade_off": trade}

    def plot(out_dir: str) -> str:
        from eval.plots import plot_scaling

        return plot_scaling(out_dir, "scaling_by_encoder.png", sizes,
                            {n: (runs[n]["error_percent"], runs[n]["a"], runs[n]["b"]) for n in order})

    lines += ["![error against memory size, per encoder](scaling_by_encoder.png)", ""]
    return {"figures": figures, "report": "\n".join(lines), "plot": plot}


def _aligned(series: dict) -> tuple[dict, int, int]:
    """Every series on the same items and queries: those each encoder embedded (an encoder's
    quarantined rows leave all series), in the first series' order."""
    mem_ids = _common_ids([m.ids for m, _, _ in series.values()])
    q_ids = _common_ids([q.ids for _, q, _ in series.values()])
    for name, (mem, q, _) in series.items():
        if len(mem_ids) < 0.5 * len(mem) or len(q_ids) < 0.5 * len(q):
            raise ValueError(f"series {name!r} does not hold the same memory items and queries as the others "
                             f"(only {len(mem_ids)} items and {len(q_ids)} queries in common); "
                             "embed the same images with every encoder")
    aligned = {name: (_select(mem, mem_ids), _select(q, q_ids), cost) for name, (mem, q, cost) in series.items()}
    return aligned, len(mem_ids), len(q_ids)


def _encoder_row(name: str, f: dict, c: dict) -> list:
    """One encoder's row: its cost, its error at every size and its fit."""
    fit = (f"{f['a']:.3f}", f"{f['b']:.3f}", f"{f['r2_log']:.3f}") if f["a"] is not None else ("-",) * 3
    return [name, f"{c['params_m']:.1f}" if "params_m" in c else "-",
            f"{c['images_per_s']:.0f}" if "images_per_s" in c else "-",
            *(f"{e:.2f}" for e in f["error_percent"]), *fit]


def _trade_off(order: list, runs: dict, full_error: dict, sizes: list) -> tuple[list, list]:
    """``(figures, report lines)``: the memory each weaker encoder needs to match each stronger one."""
    trade, lines = [], []
    for i, weak in enumerate(order):
        fw = runs[weak]
        if fw["a"] is None or fw["a"] >= 0:
            continue
        for strong in order[i + 1:]:
            if full_error[strong] <= 0:
                lines.append(f"- {strong} makes no error at M = {sizes[-1]}; the law of {weak} never reaches 0%.")
                continue
            need = float(scaling.size_for_error([full_error[strong]], fw["a"], fw["b"])[0])
            beyond = "extrapolated" if need > sizes[-1] else "within the measured sizes"
            trade.append({"encoder": weak, "matches": strong, "at_size": sizes[-1], "error_percent": full_error[strong],
                          "memory_needed": need, "times_full": need / sizes[-1]})
            lines.append(f"- {weak} would need M = {need:,.3g} ({need / sizes[-1]:,.3g}x the full {sizes[-1]}; "
                         f"{beyond}) to match the {full_error[strong]:.2f}% error of {strong} at M = {sizes[-1]}.")
    if not trade:
        lines.append("- No trade-off figure: no encoder has a falling fit.")
    return trade, lines


def _common_ids(id_lists) -> np.ndarray:
    """Ids present in every list, in the first list's order."""
    common = set(id_lists[0]).intersection(*map(set, id_lists[1:]))
    return np.array([i for i in id_lists[0] if i in common], dtype=object)


def _select(split: Split, ids) -> Split:
    where = {i: r for r, i in enumerate(split.ids)}
    return split.take(np.array([where[i] for i in ids], dtype=np.int64))
