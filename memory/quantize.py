"""Pure numpy vector quantisers for a shard's stored copy: float16, per-vector int8 and int4, nibble packing.

Each storage mode (``MODES``) keeps one copy of a shard's L2-normalised vectors on disk, the source
for later rebuilds (``add``, ``compact``) and, for the exact backend, the index itself:

- ``float32`` and ``float16``: the vectors as they are, or rounded to half precision;
- ``int8``: per-vector scaled integers, ``x ~ codes * scale`` with ``scale = max|x| / 127``;
- ``codes``: per-vector scaled 4-bit integers (``scale = max|x| / 7``, codes -7..7 stored as 0..15,
  two per byte): the rebuild copy of a ScaNN memory whose search uses its anisotropic-hashing codes;
- ``pca``: PCA transform codes (:mod:`memory.transform_codes`), a bitstream per item plus the shard's
  codebook, an eighth of float32's bytes in all; the exact backend scores them without decoding.

Rounding per vector is stable under a rebuild: decoding, re-normalising and encoding again gives
the same codes, because the largest component maps to the largest code whatever the vector's norm.
``pca`` is fitted again at each rebuild (``add``, ``compact``): its error does not compound much,
because a reconstruction lies on the levels the next fit places (tests/test_memory_storage_modes.py).
"""
from __future__ import annotations

import numpy as np

from memory import transform_codes

MODES = ("float32", "float16", "int8", "codes", "pca")
# Largest code magnitude of the per-vector scaled integer formats.
INT8_MAX = 127
INT4_MAX = 7


def check_mode(mode: str, backend: str | None = None) -> str:
    """``mode`` if it is a storage mode the ``backend`` supports; a ValueError naming the choices otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown storage mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "codes" and backend == "exact":
        raise ValueError("storage mode 'codes' keeps only ScaNN's hashing codes: use --backend scann "
                         "(exact search needs float32, float16, int8 or pca)")
    if mode == "pca" and backend == "scann":
        raise ValueError("storage mode 'pca' is scored by the exact backend: use --backend exact "
                         "(a ScaNN memory at about this size: --storage codes)")
    return mode


def scaled_ints(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int8 in [-top, top], scale float32 (N,))`` with ``x ~ codes * scale[:, None]``."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x), np.float32)
    scale = np.where(peak > 0, peak / top, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / scale[:, None]), -top, top).astype(np.int8)
    return codes, scale


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """``(N, m)`` integers in 0..15 to ``(N, ceil(m / 2))`` bytes: even columns low nibble, odd high."""
    v = np.asarray(values, dtype=np.uint8)
    if v.shape[1] % 2:
        v = np.concatenate([v, np.zeros((len(v), 1), np.uint8)], axis=1)
    return (v[:, 0::2] | (v[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, m: int) -> np.ndarray:
    """The inverse of :func:`pack_nibbles`: ``(N, m)`` uint8 values 0..15."""
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty((len(p), 2 * p.shape[1]), np.uint8)
    out[:, 0::2] = p & 0x0F
    out[:, 1::2] = p >> 4
    return out[:, :m]


def encode(x: np.ndarray, mode: str) -> dict:
    """The arrays a mode stores for rows ``x`` (float32, normalised): ``{"vectors": ..., "scales": ...}``."""
    check_mode(mode)
    x = np.asarray(x, dtype=np.float32)
    if mode in ("float32", "float16"):
        return {"vectors": x.astype(mode)}
    if mode == "int8":
        codes, scale = scaled_ints(x, INT8_MAX)
        return {"vectors": codes, "scales": scale}
    if mode == "pca":
        book = transform_codes.fit(x)
        return {"vectors": transform_codes.encode(x, book), "codebook": book}
    codes, scale = scaled_ints(x, INT4_MAX)
    return {"vectors": pack_nibbles(codes.astype(np.int16) + INT4_MAX + 1), "scales": scale}


def decode(arrays: dict, mode: str, dim: int) -> np.ndarray:
    """Float32 rows ``(N, dim)`` from what :func:`encode` stored (not re-normalised)."""
    check_mode(mode)
    v = arrays["vectors"]
    if mode in ("float32", "float16"):
        return np.asarray(v, dtype=np.float32)
    if mode == "pca":
        return transform_codes.decode(v, arrays["codebook"])
    scale = np.asarray(arrays["scales"], dtype=np.float32)[:, None]
    if mode == "int8":
        return np.asarray(v, dtype=np.float32) * scale
    codes = unpack_nibbles(v, dim).astype(np.float32) - (INT4_MAX + 1)
    return codes * scale


def max_error(x: np.ndarray, mode: str) -> np.ndarray:
    """Per row, the largest ``|<q, x> - <q, decode(encode(x))>|`` over unit queries ``q``: ``||x - x^||``."""
    x = np.asarray(x, dtype=np.float32)
    return np.linalg.norm(x - decode(encode(x, mode), mode, x.shape[1]), axis=1)


def bytes_per_vector(dim: int, mode: str) -> int:
    """Bytes :func:`encode` stores per row (array payload only, no file headers). Not for ``pca``, whose
    bytes depend on the shard's codebook: ``vismem info`` measures them."""
    if check_mode(mode) == "pca":
        raise ValueError("pca's bytes per row depend on the shard it is fitted to: measure them (vismem info)")
    return {"float32": 4 * dim, "float16": 2 * dim, "int8": dim + 4, "codes": (dim + 1) // 2 + 4}[mode]
