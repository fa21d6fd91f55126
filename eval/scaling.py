"""The memory-size scaling law of Appendix E: ``log10(e) = a * log10(log10(M)) + b``.

``e`` is the top-1 error in percent at memory size ``M``. The paper's fits: DINOv2 ViT-L/14
``a = -0.9434, b = 2.0704``; ViT-S/14 ``a = -1.0942, b = 2.3187``.
"""
from __future__ import annotations

import numpy as np

PAPER_FITS = {
    "dinov2-vit-l14": (-0.9434, 2.0704),
    "dinov2-vit-s14": (-1.0942, 2.3187),
}


def _loglog(memory_sizes) -> np.ndarray:
    m = np.asarray(memory_sizes, dtype=np.float64)
    if np.any(m <= 10):
        raise ValueError("memory sizes must exceed 10 (log10(log10(M)) is undefined or negative otherwise)")
    return np.log10(np.log10(m))


def fit_scaling_law(memory_sizes, error_percent) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``log10(e) = a * log10(log10(M)) + b`` (``np.polyfit`` degree 1).

    Raises:
        ValueError: fewer than two points, mismatched lengths, sizes <= 10, or errors not in (0, 100].
    """
    e = np.asarray(error_percent, dtype=np.float64)
    m = np.asarray(memory_sizes, dtype=np.float64)
    if m.shape != e.shape or m.ndim != 1 or len(m) < 2:
        raise ValueError(f"need two or more (size, error) pairs of equal length, got {m.shape} and {e.shape}")
    if np.any(e <= 0) or np.any(e > 100):
        raise ValueError("errors must be percentages in (0, 100]")
    a, b = np.polyfit(_loglog(m), np.log10(e), 1)
    return float(a), float(b)


def predict_error(memory_sizes, a: float, b: float) -> np.ndarray:
    """Top-1 error in percent that the law ``(a, b)`` predicts at each memory size."""
    return 10.0 ** (a * _loglog(memory_sizes) + b)


def size_for_error(error_percent, a: float, b: float) -> np.ndarray:
    """Memory size at which the law ``(a, b)`` reaches ``error_percent`` (the inverse of :func:`predict_error`).

    Used for the compute-memory trade-off: how large a memory a cheaper encoder needs to match a
    stronger encoder's error. An extrapolation whenever the answer lies beyond the measured sizes.
    """
    e = np.asarray(error_percent, dtype=np.float64)
    if np.any(e <= 0) or a >= 0:
        raise ValueError("the inverse needs errors > 0 and a law whose error falls with size (a < 0)")
    with np.errstate(over="ignore"):
        return 10.0 ** (10.0 ** ((np.log10(e) - b) / a))


def goodness_of_fit(memory_sizes, error_percent, a: float, b: float) -> dict:
    """R^2 in log space and the largest absolute error in percentage points."""
    e = np.asarray(error_percent, dtype=np.float64)
    y = np.log10(e)
    yhat = a * _loglog(memory_sizes) + b
    ss_res = float(((y - yhat) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {
        "r2_log": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "max_abs_error_points": float(np.abs(predict_error(memory_sizes, a, b) - e).max()),
    }
