"""PNG plots of an evaluation (matplotlib, headless)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, out_dir, name) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def write_eval_plots(out_dir, *, acc, hit, rel, rel_fit, cal, dist_in, dist_ood, sweeps) -> list:
    """Draw the evaluation's six figures into ``out_dir``; returns their file names."""
    names = []
    ks = np.arange(1, len(hit) + 1)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, a in acc.items():
        ax.plot(ks, 100 * a, label=method)
    ax.set(xlabel="k (neighbours)", ylabel="top-1 accuracy (%)", title="Accuracy by voting rule (Figure 2)")
    ax.set_xscale("log")
    ax.legend()
    names.append(_save(fig, out_dir, "accuracy_by_k.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, 100 * hit)
    ax.set(xlabel="k", ylabel="hit rate (%)", title="True label among the first k neighbours")
    ax.set_xscale("log")
    names.append(_save(fig, out_dir, "hit_rate.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    i = np.arange(1, len(rel) + 1)
    ax.plot(i, 100 * rel, ".", label="measured")
    ax.plot(i, 100 * (rel_fit[0] * np.log(i) + rel_fit[1]), "k-", label=f"{rel_fit[0]:.3f} ln(i) + {rel_fit[1]:.3f}")
    ax.set(xlabel="neighbour index i", ylabel="accuracy of neighbour i alone (%)", title="Neighbour reliability")
    ax.legend()
    names.append(_save(fig, out_dir, "reliability.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    counts = sorted(cal["count"])
    ax.plot(counts, [100 * cal["count"][c][0] for c in counts], "o-")
    ax.set(xlabel="count of the plurality class among neighbours", ylabel="accuracy (%)", title="Calibration")
    names.append(_save(fig, out_dir, "calibration.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    j = np.arange(1, len(dist_in) + 1)
    ax.plot(j, dist_in, label="in distribution")
    if dist_ood is not None:
        ax.plot(j, dist_ood, label="out of distribution")
    ax.set(xlabel="neighbour index", ylabel="mean cosine distance", title="Distance to the first neighbours")
    ax.legend()
    names.append(_save(fig, out_dir, "distances.png"))

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, method, param in zip(axes, ("rank", "softmax", "distance"), ("alpha", "tau", "xi")):
        values = list(sweeps[method])
        ax.plot(values, [100 * sweeps[method][v].max() for v in values], "o-", label="best k")
        for k in (10, 50, 100):
            if k <= len(ks):
                ax.plot(values, [100 * sweeps[method][v][k - 1] for v in values], ".--", label=f"k={k}")
        ax.set(xscale="log", xlabel=param, ylabel="accuracy (%)", title=f"{method} voting")
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    names.append(_save(fig, out_dir, "sweeps.png"))
    return names


def write_confidence_plots(out_dir, figures: dict) -> list:
    """Each rule's reliability diagram and risk-coverage curve (``eval.calibration``), one line per rule;
    returns the two file names."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([0, 1], [0, 100], "k--", lw=0.8, label="calibrated")
    for method, f in figures.items():
        r = f["reliability"]
        held = r["count"] > 0
        ax.plot(r["confidence"][held], 100 * r["accuracy"][held], "o-",
                label=f"{method} (k={f['k']}, ECE {r['ece']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 101), xlabel="confidence (voted class's share, 10 bins: mean)",
           ylabel="accuracy (%)", title="Reliability diagram")
    ax.legend(fontsize=7)
    names = [_save(fig, out_dir, "reliability_diagram.png")]

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, f in figures.items():
        rc = f["risk_coverage"]
        ax.plot(100 * rc["coverage"], 100 * rc["accuracy"], "-", label=f"{method} (k={f['k']})")
    ax.axvline(90, color="0.6", ls=":", lw=1)
    ax.set(xlim=(0, 100), xlabel="coverage: queries answered, most confident first (%)",
           ylabel="accuracy of the answered (%)", title="Risk-coverage")
    ax.legend(fontsize=7)
    names.append(_save(fig, out_dir, "risk_coverage.png"))
    return names


def plot_scaling(out_dir, name, sizes, series) -> str:
    """Error against memory size (log x), one line per series ``{label: (errors, a, b)}`` with its fit."""
    from eval.scaling import predict_error

    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.geomspace(max(min(sizes), 11), max(sizes), 100)
    for label, (errors, a, b) in series.items():
        line, = ax.plot(sizes, errors, "o", label=label)
        if a is not None:
            ax.plot(grid, predict_error(grid, a, b), "-", color=line.get_color(), alpha=0.6)
    ax.set(xlabel="memory size M (items)", ylabel="top-1 error (%)", title="Scaling with memory size (Appendix E)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend()
    return _save(fig, out_dir, name)
