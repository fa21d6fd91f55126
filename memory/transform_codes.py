"""PCA transform codes, the ``pca`` storage mode: an eighth of float32's bytes, the bits where the votes need them.

A visual memory needs the voted label, not every bit of every vector. Per-vector int4 (``codes``'s
rebuild copy) and ScaNN's own hashing codes at 1/8 of float32's bytes both changed 0.6-1.1% of the
rank votes (k = 50) on the 1,280-d Fashion-MNIST EfficientNet-Lite0 embeddings; this transform coder
changes 0.40-0.45% at fewer bytes, codebook included (benchmarks/storage.py, README). Per shard, fitted
on a sample of its items:

1. centre the items and rotate them onto their principal axes (the rotation is kept in float16);
2. give each axis bits by greedy reverse water-filling: one more bit on an axis divides its squared
   error by about 4, and what that error costs a dot product is the axis's variance times the query's
   second moment along it (queries look like items: the variance plus the squared mean), so axes
   that carry the mean and the spread get up to ``MAX_BITS`` bits and the flat tail none;
3. place each axis's ``2 ** bits`` levels with Lloyd's algorithm (1-d k-means);
4. store each item's level numbers as one little-endian bitstream.

Scoring needs no decode to full dimension: ``<q, x^> = <R^T q, y^> + <q, mean>``, where ``y^`` are the
item's levels on the kept axes. Pure numpy; :mod:`memory.exact_kernel` does the same in torch blocks.
"""
from __future__ import annotations

import heapq

import numpy as np

MIN_BITS_PER_DIM = 3.0  # the least the trimming to an eighth of float32 leaves a dimension
SLACK_BYTES = 3  # per item, left of the eighth for what a loaded shard holds besides codes and codebook (measured 1-2)
MAX_BITS = 12       # most bits one axis gets (a level number then spans at most 3 bytes of the stream)
FIT_SAMPLE = 65_536  # items the rotation, the bits and the levels are fitted on
LLOYD_ITERS = 15
ENCODE_CHUNK = 65_536  # items packed at a time (bounds the temporary byte-major stream)


def budget_bits(items: int, dim: int) -> int:
    """First guess of the bits per item that, with the shard's codebook (about ``2 dim^2`` bytes: the
    float16 rotation), fill an eighth of float32's ``4 dim`` bytes per item; :func:`fit` then trims it
    by the codebook it actually made. At least ``MIN_BITS_PER_DIM`` a dimension; 4 where the codebook
    would take half of the eighth (small shards)."""
    if 2 * dim * dim / max(items, 1) > dim / 4:
        return 4 * dim
    return int(max(MIN_BITS_PER_DIM * dim, 4 * dim - 16 * dim * dim / max(items, 1)))


def book_bytes(bits: np.ndarray, dim: int) -> int:
    """Bytes of a codebook giving ``bits`` to the axes: rotation (float16), levels (float32), the rest."""
    kept = bits[bits > 0]
    return 2 * dim * len(kept) + 4 * int((2 ** kept).sum()) + 9 * len(kept) + 4 * dim


def fit(x: np.ndarray, bits_given: int | None = None, sample: int = FIT_SAMPLE, seed: int = 0) -> dict:
    """The codebook of ``x`` (float32 rows): ``mean (d,)``, ``rotation (d, m) float16`` onto the ``m``
    axes that get bits, ``bits (m,)``, every axis's sorted ``levels`` end to end, and ``level_start (m,)``.
    ``bits_given``: bits per item (default: an eighth of float32's bytes with the codebook, for ``len(x)`` items)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"pca codes need a non-empty (items, dim) array, got shape {x.shape}")
    n, d = x.shape
    budget = budget_bits(n, d) if bits_given is None else int(bits_given)
    if len(x) > sample:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False))]
    mean = x.mean(axis=0)
    cov = np.cov((x - mean).T, bias=True).reshape(d, d)
    var, axes = np.linalg.eigh(cov)
    var, axes = np.maximum(var[::-1], 0.0), axes[:, ::-1]
    # Rotation rounded once, then used as stored, so encoding and scoring project the same way.
    axes = axes.astype(np.float16).astype(np.float32)
    impact = var * (var + (mean @ axes) ** 2)  # squared error's cost on a dot product, per unit of error
    bits = allocate_bits(impact, budget)
    # Trim the bits until codes and this codebook's share fit in an eighth of float32, unless the shard
    # is so small that its codebook alone takes half of that (budget_bits gave it 4 bits a dimension).
    if bits_given is None and budget < 4 * d:
        for _ in range(8):
            over = (budget + 7) // 8 + book_bytes(bits, d) / n - (d / 2 - SLACK_BYTES)
            if over <= 0 or budget <= MIN_BITS_PER_DIM * d:
                break
            budget = max(int(MIN_BITS_PER_DIM * d), budget - int(np.ceil(8 * over)))
            bits = allocate_bits(impact, budget)
    keep = np.flatnonzero(bits)
    y_t = axes[:, keep].T @ (x - mean).T  # (m, items): one axis per row
    levels = [lloyd(y_t[j], 2 ** int(bits[i])) for j, i in enumerate(keep)]
    sizes = np.array([len(lv) for lv in levels], np.int64)
    return {"mean": mean.astype(np.float32), "rotation": axes[:, keep].astype(np.float16),
            "bits": bits[keep].astype(np.int8),
            "levels": np.concatenate(levels).astype(np.float32) if levels else np.zeros(0, np.float32),
            "level_start": (np.cumsum(sizes) - sizes).astype(np.int64)}


def allocate_bits(impact: np.ndarray, budget: int, max_bits: int = MAX_BITS) -> np.ndarray:
    """Bits per axis: each of ``budget`` bits goes where it removes the most cost (``impact x 4^-bits``)."""
    bits = np.zeros(len(impact), np.int64)
    heap = [(-float(w), j) for j, w in enumerate(impact) if w > 0]
    heapq.heapify(heap)
    for _ in range(max(budget, 0)):
        if not heap:
            break
        gain, j = heapq.heappop(heap)
        bits[j] += 1
        if bits[j] < max_bits:
            heapq.heappush(heap, (gain / 4.0, j))
    return bits


def lloyd(values: np.ndarray, count: int, iters: int = LLOYD_ITERS) -> np.ndarray:
    """``count`` sorted levels minimising the squared error of ``values`` (1-d k-means from even spacing)."""
    lo, hi = float(values.min()), float(values.max())
    levels = np.linspace(lo, hi, count) if hi > lo else np.full(count, lo)
    for _ in range(iters):
        cell = nearest_level(values, levels)
        sums = np.bincount(cell, values, count)
        hits = np.bincount(cell, None, count)
        levels = np.sort(np.where(hits > 0, sums / np.maximum(hits, 1), levels))
    return levels.astype(np.float32)


def nearest_level(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``levels`` for each value."""
    return np.searchsorted((levels[1:] + levels[:-1]) / 2, values).astype(np.int64)


def code_bytes(book: dict) -> int:
    """Bytes of one item's bitstream."""
    return (int(np.asarray(book["bits"], np.int64).sum()) + 7) // 8


def layout(book: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per kept axis: first byte of its level number in the stream, bit shift within it, and mask."""
    bits = np.asarray(book["bits"], np.int64)
    start = np.cumsum(bits) - bits
    return start // 8, start % 8, (1 << bits) - 1


def encode(x: np.ndarray, book: dict) -> np.ndarray:
    """``(N, code_bytes)`` uint8 bitstreams of the rows of ``x`` under ``book``."""
    x = np.asarray(x, dtype=np.float32)
    first, shift, _ = layout(book)
    rotation_t = np.ascontiguousarray(np.asarray(book["rotation"], np.float32).T)
    nbytes = code_bytes(book)
    out = np.empty((len(x), nbytes), np.uint8)
    for a in range(0, len(x), ENCODE_CHUNK):
        y_t = rotation_t @ (x[a:a + ENCODE_CHUNK] - book["mean"]).T  # (m, chunk): one axis per row
        stream_t = np.zeros((nbytes + 2, y_t.shape[1]), np.uint8)  # byte-major, so each OR is one row
        for j in range(len(y_t)):
            lv = book["levels"][book["level_start"][j]:book["level_start"][j] + (1 << int(book["bits"][j]))]
            v = nearest_level(y_t[j], lv) << shift[j]  # at most 12 + 7 bits: three bytes
            for byte in range(3):
                stream_t[first[j] + byte] |= ((v >> (8 * byte)) & 0xFF).astype(np.uint8)
        out[a:a + y_t.shape[1]] = stream_t[:nbytes].T
    return out


def level_numbers(packed: np.ndarray, book: dict) -> np.ndarray:
    """``(N, m)`` level numbers read back from the bitstreams."""
    first, shift, mask = layout(book)
    p = np.concatenate([np.asarray(packed, np.uint8), np.zeros((len(packed), 2), np.uint8)], axis=1)
    word = p[:, first].astype(np.int64) | (p[:, first + 1].astype(np.int64) << 8) | (p[:, first + 2].astype(np.int64) << 16)
    return (word >> shift) & mask


def components(packed: np.ndarray, book: dict) -> np.ndarray:
    """``(N, m)`` float32: each item's levels on the kept axes (its centred, rotated reconstruction)."""
    return np.asarray(book["levels"], np.float32)[level_numbers(packed, book) + book["level_start"]]


def decode(packed: np.ndarray, book: dict) -> np.ndarray:
    """``(N, d)`` float32 reconstructions (not re-normalised)."""
    return components(packed, book) @ np.asarray(book["rotation"], np.float32).T + book["mean"]


def project_queries(q: np.ndarray, book: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(R^T q, <q, mean>)``: a query's side of ``<q, x^> = <R^T q, y^> + <q, mean>``."""
    q = np.asarray(q, dtype=np.float32)
    return q @ np.asarray(book["rotation"], np.float32), q @ book["mean"]
