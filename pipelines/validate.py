"""The Beam build's row batches: reading, validation by the memory's item policy, dead-letter records.

Pure functions on row batches (plain dicts of numpy arrays), so the Beam build only calls them. A
batch holds ``file``, ``rows`` (row numbers in that file), ``ids``, ``embeddings`` ``(N, dim)``,
``labels`` and the provenance columns of ``memory.schema``. Every rejected row becomes one
dead-letter record naming the file, the row and the reason.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from memory import items, schema
from memory.partition import hash_partition

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


MAX_PROBLEM_LINES = 10  # an error lists this many problems, then how many more there are


class BadInputs(ValueError):
    """Embedding shards refused at the door: one line per problem, naming the file, the column and the reason.

    ``problems``: ``[(file, column or None, reason)]``.
    """

    def __init__(self, problems):
        self.problems = list(problems)
        lines = [f"{f}: column '{c}' {why}" if c else f"{f}: {why}" for f, c, why in self.problems]
        if len(lines) > MAX_PROBLEM_LINES:
            more = len(lines) - MAX_PROBLEM_LINES
            lines = lines[:MAX_PROBLEM_LINES] + [f"... and {more} more problem{'s' * (more > 1)} in the embedding "
                                                 "shards (the first are listed above)"]
        super().__init__("\n".join(lines))


def check_inputs(info: dict, dim: int, where, *, dim_from: str = "the memory's dimension is",
                 skip_bad_files: bool = False) -> None:
    """Refuse at the door embedding shards that a Parquet footer shows to be wrong, or that hold no row
    the memory could take (``info``: ``pipelines.build.inspect_inputs``). Otherwise the Beam job would
    start, every row of such a file would go to the dead letter, and the reason would be found only there.

    Files that cannot be read, columns missing or of the wrong type (``memory.schema.schema_problems``)
    and embeddings of another dimension than ``dim`` are each one line of :class:`BadInputs`.
    ``skip_bad_files``: let those files through instead (their rows go to the dead letter with the reason).

    Raises:
        BadInputs: a problem per line, naming the file, the column and the reason.
        ValueError: no rows at all, or none of dimension ``dim``.
    """
    if info["problems"] and not skip_bad_files:
        raise BadInputs(info["problems"])
    if not info["dims"]:
        raise ValueError(f"none of the embedding shards at {where} is readable")
    if info["rows"] == 0:
        raise ValueError(f"the embedding shards at {where} hold no rows")
    if dim not in info["dims"]:
        found = ", ".join(f"{d}-d" if d > 0 else "variable-length" for d in sorted(info["dims"]))
        raise ValueError(f"the embedding shards at {where} hold {found} embeddings, none of dimension {dim}")
    other = [(f, "embedding", f"holds {d}-d embeddings; {dim_from} {dim}")
             for f, d in info.get("file_dims", {}).items() if d != dim]
    if other and not skip_bad_files:
        raise BadInputs(other)


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

    Each row is checked by the memory's :class:`memory.items.ItemPolicy` (the first reason that
    applies goes to the dead letter); ids in ``forgotten`` (a set: removed for unlearning) are
    rejected unless ``readmit``. Duplicate ids are found across all batches (``id_buckets``), not here.
    """
    policy = items.ItemPolicy(dim, num_classes, norm_tolerance)
    reason = policy.reasons(batch["ids"], batch["embeddings"], batch["labels"],
                            label_sources=batch["label_source"], forgotten=None if readmit else forgotten,
                            unique=False)
    bad = np.flatnonzero(np.not_equal(reason, None))
    good = take(batch, np.flatnonzero(np.equal(reason, None)))
    good["embeddings"] = items.normalise(good["embeddings"]) if len(good["ids"]) else good["embeddings"]
    return good, dead_records(batch, bad, reason[bad])


def id_buckets(ids, num_buckets: int) -> dict[int, np.ndarray]:
    """``{bucket: ids}``: ids split by stable hash, so equal ids meet in one bucket."""
    ids = np.asarray(ids, dtype=object)
    where = hash_partition(ids, num_buckets)
    return {int(b): ids[where == b] for b in np.unique(where)}

