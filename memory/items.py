"""Memory items: what may enter a memory (one policy for every door) and the one reader of items tables.

Every door checks rows with an :class:`ItemPolicy`: ``write_memory`` strictly (the first bad row is
an error), the Beam build and ``add`` row by row (each bad row goes to the dead letter with its
reason), serving before it stages an ``add``. A memory stores L2-normalised vectors, so admitted
rows are renormalised whatever their norm was.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import schema, storage
from memory.manifest import ShardEntry

ITEMS_FILE = "items.parquet"
# The dead-letter reasons of the Beam build: switching a door to this policy changes no output.
EMPTY_ID = "empty id"
NOT_FINITE = "NaN or infinite values in the embedding"
ZERO = "all-zero embedding (no direction)"
NO_LABEL = "no label (-1): a memory item needs a class"
FORGOTTEN = "id was removed from this memory (unlearning); add it back only with --readmit"


def normalise(x, what: str = "embeddings", ids=None) -> np.ndarray:
    """L2-normalised float32 copy of ``x`` ``(N, dim)``; rejects NaN, infinite and zero rows by name."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-d (rows, dim) array, got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        where = ids[np.flatnonzero(bad)[0]] if ids is not None else int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} contain NaN or infinite values ({int(bad.sum())} rows, first: {where})")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if len(zero):
        where = ids[zero[0]] if ids is not None else int(zero[0])
        raise ValueError(f"{what} contain all-zero rows, which have no direction (first: {where})")
    return x / norms


def duplicate_reasons(new_ids, existing_ids=()) -> dict[str, str]:
    """``{id: reason}`` for every new id given more than once or already in the memory."""
    new = np.asarray(new_ids, dtype=object).astype(str)
    out = {}
    if len(new):
        uniq, counts = np.unique(new, return_counts=True)
        for i, c in zip(uniq[counts > 1], counts[counts > 1]):
            out[str(i)] = f"duplicate id: {c} input rows share it (all are rejected)"
    existing = set(np.asarray(existing_ids, dtype=object).astype(str).tolist()) if len(existing_ids) else set()
    for i in set(new.tolist()) & existing:
        out.setdefault(i, "id already in the memory (remove it first to replace it)")
    return out


@dataclasses.dataclass(frozen=True)
class ItemPolicy:
    """Which rows may enter a memory of ``dim``-dimensional embeddings and ``num_classes`` classes.

    ``norm_tolerance``: how far a row's L2 norm may lie from 1 (embedding shards are normalised, so
    a larger gap means a wrong file); ``None`` accepts any finite, non-zero norm.
    """

    dim: int
    num_classes: int
    norm_tolerance: float | None = 0.01

    def __post_init__(self):
        if int(self.dim) < 1 or int(self.num_classes) < 1:
            raise ValueError(f"an item policy needs dim >= 1 and num_classes >= 1, got {self.dim}, {self.num_classes}")
        if self.norm_tolerance is not None and not self.norm_tolerance >= 0:
            raise ValueError(f"norm tolerance must be >= 0 or None, got {self.norm_tolerance}")

    def reasons(self, ids, embeddings, labels, *, label_sources=None, forgotten=None,
                unique=True) -> np.ndarray:
        """Why each row may not enter: an object array ``(N,)``, ``None`` where a row may.

        The first reason that applies: an empty id; a dimension other than ``dim``; NaN or infinite
        values; a zero vector; a norm outside the tolerance; no label (-1); a label outside the
        classes; a ``label_source`` not in ``schema.LABEL_SOURCES``; an id in ``forgotten`` (removed
        for unlearning); with ``unique``, an id that other otherwise good rows share.

        Raises:
            ValueError: ids, embeddings and labels (and label sources) differ in length.
        """
        ids = np.asarray(ids, dtype=object)
        emb = np.asarray(embeddings, dtype=np.float32)
        labels = np.asarray(labels).astype(np.int64)
        n = len(ids)
        lengths = {len(emb), len(labels), *(() if label_sources is None else (len(label_sources),))}
        if lengths != {n}:
            raise ValueError(f"embeddings {emb.shape}, labels ({len(labels)},) and ids ({n},) must have one row per item")
        reason = np.full(n, None, dtype=object)

        def reject(mask, text):
            fresh = np.flatnonzero(mask & np.equal(reason, None))
            reason[fresh] = [text(i) for i in fresh] if callable(text) else text

        reject(np.fromiter((not isinstance(i, str) or not i for i in ids), bool, n), EMPTY_ID)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            reject(np.ones(n, bool), f"dimension {emb.shape[-1] if emb.ndim == 2 else '?'} differs from the memory's {self.dim}")
            return reason
        finite = np.isfinite(emb).all(axis=1)
        reject(~finite, NOT_FINITE)
        norms = np.linalg.norm(np.where(finite[:, None], emb, 0.0), axis=1)
        reject(norms == 0, ZERO)
        tol = self.norm_tolerance
        if tol is not None:
            reject(np.abs(norms - 1.0) > tol,
                   lambda i: f"norm {norms[i]:.4g} is not 1 within {tol}: the embedding is not L2-normalised")
        reject(labels == schema.UNKNOWN_LABEL, NO_LABEL)
        reject((labels < 0) | (labels >= self.num_classes),
               lambda i: f"label {labels[i]} outside the {self.num_classes} class names")
        if label_sources is not None:
            src = np.asarray(label_sources, dtype=object)
            reject(~np.isin(src.astype(str), schema.LABEL_SOURCES),
                   lambda i: f"label_source {src[i]!r} is not one of {', '.join(schema.LABEL_SOURCES)}")
        if forgotten:
            reject(np.fromiter((i in forgotten for i in ids), bool, n), FORGOTTEN)
        if unique:
            good = np.flatnonzero(np.equal(reason, None))
            dup = duplicate_reasons(ids[good])
            if dup:
                reject(np.isin(ids.astype(str), list(dup)), lambda i: dup[str(ids[i])])
        return reason

    def admit(self, ids, embeddings, labels, *, label_sources=None, weights=None) -> np.ndarray:
        """Strict: the L2-normalised float32 embeddings when every row may enter.

        Raises:
            ValueError: naming the first bad row, its id and its reason (and how many rows are bad);
                no rows; mismatched lengths; non-integer labels; weights that are not one finite,
                non-negative value per row.
        """
        n = len(ids)
        if n == 0:
            raise ValueError("no items given")
        if np.ndim(embeddings) != 2:
            raise ValueError(f"embeddings {np.shape(embeddings)} must be a 2-d array with one row per item")
        if not np.issubdtype(np.asarray(labels).dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {np.asarray(labels).dtype}")
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
                raise ValueError("weights must be one finite, non-negative value per item")
        reason = self.reasons(ids, embeddings, labels, label_sources=label_sources)
        bad = np.flatnonzero(np.not_equal(reason, None))
        if len(bad):
            i = bad[0]
            raise ValueError(f"{len(bad)} of {n} items may not enter the memory; first: row {i} "
                             f"(id {np.asarray(ids, dtype=object)[i]!r}): {reason[i]}")
        return normalise(embeddings)


def read_items_at(shard_dir: str, columns=None) -> pa.Table:
    """The items table of the shard folder ``shard_dir`` (local or URL), optionally only ``columns``."""
    fs, p = storage.filesystem(storage.join(shard_dir, ITEMS_FILE))
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=None if columns is None else list(columns))


def read_items(root: str, entry: ShardEntry, columns=None) -> pa.Table:
    """The items table of the shard ``entry`` of the memory at ``root``, read in place."""
    return read_items_at(storage.join(root, entry.path), columns)
