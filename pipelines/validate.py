"""Row validation for memory builds: which embedding rows may enter a memory, and why the others may not.

Pure functions on row batches (plain dicts of numpy arrays), so the Beam build only calls them. A
batch holds ``file``, ``rows`` (row numbers in that file), ``ids``, ``embeddings`` ``(N, dim)``,
``labels`` and the provenance columns of ``memory.schema``. Every rejected row becomes one
dead-letter record naming the file, the row and the reason.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from memory import schema
from memory.partition import hash_partition
from memory.shard import normalise

COLUMNS = ("rows", "ids", "embeddings", "labels", *schema.PROVENANCE_COLUMNS)
DEAD_LETTER_SCHEMA = pa.schema([
    ("id", pa.string()), ("file", pa.string()), ("row", pa.int64()), ("reason", pa.string()),
    ("label", pa.int64()), ("source", pa.string()), ("uri", pa.string()),
])


def read_batches(path: str, max_rows: int):
    """The rows of one embedding shard (``memory.schema``) as batches of at most ``max_rows``."""
    data = schema.read_embeddings(path)
    n = len(data["ids"])
    for start in range(0, n, max_rows):
        sl = slice(start, min(n, start + max_rows))
        yield {"file": path, "rows": np.arange(sl.start, sl.stop, dtype=np.int64), "ids": data["ids"][sl],
               "embeddings": data["embeddings"][sl], "labels": data["labels"][sl],
               **{c: np.asarray(data["provenance"][c])[sl] for c in schema.PROVENANCE_COLUMNS}}


def take(batch: dict, idx) -> dict:
    """The rows ``idx`` of a batch."""
    files = batch["file"]
    return {"file": files if isinstance(files, str) else files[idx], **{c: batch[c][idx] for c in COLUMNS}}


def concat(batches: list) -> dict:
    """One batch from many with the same columns: rows of several files (``file`` is then per row) or shards."""
    out = {c: np.concatenate([b[c] for b in batches]) for c in batches[0] if c != "file"}
    if "file" in batches[0]:
        out["file"] = np.concatenate([np.full(len(b["ids"]), b["file"], dtype=object) if isinstance(b["file"], str)
                                      else b["file"] for b in batches])
    return out


def dead_records(batch: dict, idx, reasons) -> list[dict]:
    """Dead-letter records for rows ``idx`` of a batch, one reason each."""
    idx = np.asarray(idx, dtype=np.int64)
    files = batch["file"]
    return [
        {"id": str(batch["ids"][i]), "file": files if isinstance(files, str) else str(files[i]),
         "row": int(batch["rows"][i]), "reason": str(r), "label": int(batch["labels"][i]),
         "source": str(batch["source"][i]), "uri": str(batch["uri"][i])}
        for i, r in zip(idx, reasons)
    ]


def dead_letter_table(records: list[dict]) -> pa.Table:
    records = sorted(records, key=lambda r: (r["file"], r["row"]))
    return pa.Table.from_pylist(records, schema=DEAD_LETTER_SCHEMA)


def validate_batch(batch: dict, *, dim: int, num_classes: int, norm_tolerance: float | None = 0.01,
                   forgotten=None, readmit: bool = False):
    """Split a batch into ``(good batch with L2-normalised embeddings, dead-letter records)``.

    A row is rejected, with the first reason that applies, for: an empty id; a dimension other than
    the memory's; NaN or infinite values; a zero vector; a norm further than ``norm_tolerance`` from
    1 (embedding shards are L2-normalised; ``None`` skips the check); no label (-1); a label outside
    the class names; an id in ``forgotten`` (a set: removed for unlearning) unless ``readmit``.
    """
    n = len(batch["ids"])
    reason = np.full(n, None, dtype=object)

    def reject(mask, text):
        fresh = mask & (reason == None)  # noqa: E711 (element-wise)
        if isinstance(text, str):
            reason[fresh] = text
        else:
            for i in np.flatnonzero(fresh):
                reason[i] = text(i)

    ids = np.asarray(batch["ids"], dtype=object)
    reject(np.array([not isinstance(i, str) or not i for i in ids], dtype=bool), "empty id")
    emb = np.asarray(batch["embeddings"], dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != dim:
        reject(np.ones(n, bool), f"dimension {emb.shape[-1] if emb.ndim == 2 else '?'} differs from the memory's {dim}")
        return take(batch, np.zeros(0, np.int64)), dead_records(batch, np.arange(n), reason)
    finite = np.isfinite(emb).all(axis=1)
    reject(~finite, "NaN or infinite values in the embedding")
    norms = np.linalg.norm(np.where(finite[:, None], emb, 0.0), axis=1)
    reject(norms == 0, "all-zero embedding (no direction)")
    if norm_tolerance is not None:
        reject(np.abs(norms - 1.0) > norm_tolerance,
               lambda i: f"norm {norms[i]:.4g} is not 1 within {norm_tolerance}: the embedding is not L2-normalised")
    labels = np.asarray(batch["labels"], dtype=np.int64)
    reject(labels == schema.UNKNOWN_LABEL, "no label (-1): a memory item needs a class")
    reject((labels < 0) | (labels >= num_classes),
           lambda i: f"label {labels[i]} outside the {num_classes} class names")
    if forgotten and not readmit:
        reject(np.array([i in forgotten for i in ids], dtype=bool),
               "id was removed from this memory (unlearning); add it back only with --readmit")
    bad = np.flatnonzero(reason != None)  # noqa: E711
    good = take(batch, np.flatnonzero(reason == None))  # noqa: E711
    good["embeddings"] = normalise(good["embeddings"]) if len(good["ids"]) else good["embeddings"]
    return good, dead_records(batch, bad, reason[bad])


def id_buckets(ids, num_buckets: int) -> dict[int, np.ndarray]:
    """``{bucket: ids}``: ids split by stable hash, so equal ids meet in one bucket."""
    ids = np.asarray(ids, dtype=object)
    where = hash_partition(ids, num_buckets)
    return {int(b): ids[where == b] for b in np.unique(where)}


def duplicate_ids(new_ids, existing_ids=()) -> dict[str, str]:
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
