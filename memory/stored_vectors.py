"""A shard's stored copy of its vectors: the files of each storage mode, written and read here.

Every shard writes this copy (:func:`memory.quantize.encode`'s arrays), whatever its backend: the
exact backend searches it, and it is what rebuilds and ``read_vectors`` (prune, explanations) read.
"""
from __future__ import annotations

import os

import numpy as np

from memory import quantize

EMBEDDINGS_FILE = "embeddings.npy"
SCALES_FILE = "embedding_scales.npy"  # per-vector scales of the int8 and codes modes' stored copy
CODEBOOK_FILE = "embedding_codebook.npz"  # the pca mode's per-shard codebook (memory.transform_codes)


def storage_mode(params: dict | None, vectors: np.ndarray | None = None) -> str:
    """A shard's storage mode: ``params["storage"]``; older shards recorded ``dtype`` or only the file's dtype."""
    p = params or {}
    mode = p.get("storage") or p.get("dtype") or (str(vectors.dtype) if vectors is not None else "float32")
    return quantize.check_mode(mode)


def vector_files(mode: str) -> list[str]:
    """The files of a shard's stored copy in ``mode`` (relative to the shard folder)."""
    return [EMBEDDINGS_FILE] + {"int8": [SCALES_FILE], "codes": [SCALES_FILE], "pca": [CODEBOOK_FILE]}.get(mode, [])


def save_vectors(directory: str, arrays: dict) -> None:
    """Write :func:`memory.quantize.encode`'s arrays into a local shard folder."""
    np.save(os.path.join(directory, EMBEDDINGS_FILE), arrays["vectors"])
    if "scales" in arrays:
        np.save(os.path.join(directory, SCALES_FILE), arrays["scales"])
    if "codebook" in arrays:
        np.savez(os.path.join(directory, CODEBOOK_FILE), **arrays["codebook"])


def load_vectors(directory: str, mmap: bool = False) -> dict:
    """The stored copy's arrays (``vectors``, and ``scales`` where the mode has them) from a local folder."""
    mode = "r" if mmap else None
    out = {"vectors": np.load(os.path.join(directory, EMBEDDINGS_FILE), mmap_mode=mode)}
    scales = os.path.join(directory, SCALES_FILE)
    if os.path.exists(scales):
        out["scales"] = np.load(scales, mmap_mode=mode)
    codebook = os.path.join(directory, CODEBOOK_FILE)
    if os.path.exists(codebook):
        out["codebook"] = read_codebook(codebook)
    return out


def read_codebook(path_or_file) -> dict:
    """The pca mode's codebook arrays from its ``.npz`` (a path or an open binary file)."""
    with np.load(path_or_file, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
