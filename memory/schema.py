"""The data contracts every stage shares: the embedding shard and a memory shard's items table.

Embedding shard (written by the embedding pipeline, read by builds and queries), one Parquet file:
``id`` string (globally unique, stable), ``embedding`` fixed-size list of float16/float32,
``label`` int32 (-1 unknown), ``label_source`` ("human" | "teacher"), ``confidence`` float32,
``source`` (dataset name), ``uri`` (``memory.uris``). Schema metadata: dim, normalisation, the
encoder (``memory.encoder_spec``) and, when the source names its classes, ``class_names`` (a JSON
list: ``label`` i is ``class_names[i]``; :func:`class_names_metadata`, :func:`agreed_class_names`).

Items table (one per memory shard, row ``i`` is index row ``i``; read by ``memory.items``): ``id``,
``label``, ``weight`` (vote multiplier, 1.0 unless soft-pruned) and the provenance columns
``label_source``, ``confidence``, ``source``, ``uri``.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory import storage

LABEL_SOURCES = ("human", "teacher")
PROVENANCE_COLUMNS = ("label_source", "confidence", "source", "uri")
UNKNOWN_LABEL = -1


CLASS_NAMES_KEY = "class_names"  # schema metadata: the JSON list of the names the labels index


def class_names_metadata(names) -> dict:
    """The schema-metadata entry recording a shard's class names (none: an empty dict)."""
    return {CLASS_NAMES_KEY: json.dumps([str(n) for n in names])} if names else {}


def class_names_from_metadata(metadata: dict | None, where: str = "an embedding shard") -> list[str] | None:
    """The class names a shard's (decoded) schema metadata records, or None.

    Raises:
        ValueError: an entry that is not a JSON list of names.
    """
    raw = (metadata or {}).get(CLASS_NAMES_KEY)
    if not raw:
        return None
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: schema metadata '{CLASS_NAMES_KEY}' must be a JSON list of names, got {raw[:80]!r}")
    return names


def agreed_class_names(pairs) -> tuple[list[str] | None, str | None]:
    """``(names, the first file recording them)`` from ``(file, names or None)`` pairs; ``(None, None)``
    when no shard records any. Shards that record none are not wrong (older runs, plain writers).

    Raises:
        ValueError: two shards that record different names, both named.
    """
    first = (None, None)
    for where, names in pairs:
        if names is None:
            continue
        if first[0] is None:
            first = (list(names), where)
        elif list(names) != first[0]:
            raise ValueError(f"the embedding shards disagree on their class names: {where} has "
                             f"{describe_names(names, first[0])}, {first[1]} has {describe_names(first[0], names)}")
    return first


def describe_names(names, other=None) -> str:
    """A list of class names in a message: the first five, how many, and where it first differs from ``other``."""
    names = list(names)
    text = f"[{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}] ({len(names)})"
    if other is not None:
        other = list(other)
        at = next((i for i, (a, b) in enumerate(zip(names, other)) if a != b), min(len(names), len(other)))
        if at >= 5 and at < len(names):
            text += f" with class {at} {names[at]!r}"
    return text


def embedding_schema(dim: int, dtype: str = "float32", metadata: dict | None = None) -> pa.Schema:
    value = {"float32": pa.float32(), "float16": pa.float16()}.get(dtype)
    if value is None:
        raise ValueError(f"embedding dtype must be float32 or float16, got {dtype!r}")
    meta = {"dim": str(dim), "normalisation": "l2", **{k: str(v) for k, v in (metadata or {}).items()}}
    return pa.schema(
        [
            ("id", pa.string()),
            ("embedding", pa.list_(value, dim)),
            ("label", pa.int32()),
            ("label_source", pa.string()),
            ("confidence", pa.float32()),
            ("source", pa.string()),
            ("uri", pa.string()),
        ],
        metadata={k.encode(): v.encode() for k, v in meta.items()},
    )


ITEMS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int32()),
        ("weight", pa.float32()),
        ("label_source", pa.string()),
        ("confidence", pa.float32()),
        ("source", pa.string()),
        ("uri", pa.string()),
    ]
)


def default_provenance(n: int) -> dict:
    """Provenance of ``n`` items nobody described: human labels, full confidence, no source or uri."""
    return {
        "label_source": np.full(n, "human", dtype=object),
        "confidence": np.ones(n, dtype=np.float32),
        "source": np.full(n, "", dtype=object),
        "uri": np.full(n, "", dtype=object),
    }


def embedding_table(ids, embeddings, labels, *, dtype="float32", provenance=None, metadata=None) -> pa.Table:
    """Build an embedding-shard table from arrays (the one constructor every writer uses)."""
    embeddings = np.asarray(embeddings)
    n, dim = embeddings.shape
    prov = {**default_provenance(n), **(provenance or {})}
    flat = pa.array(embeddings.astype(dtype).ravel())
    return pa.Table.from_arrays(
        [
            pa.array(np.asarray(ids, dtype=object), pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, dim),
            pa.array(np.asarray(labels, dtype=np.int32)),
            pa.array(prov["label_source"], pa.string()),
            pa.array(np.asarray(prov["confidence"], dtype=np.float32)),
            pa.array(prov["source"], pa.string()),
            pa.array(prov["uri"], pa.string()),
        ],
        schema=embedding_schema(dim, dtype, metadata),
    )


def _is_embedding(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


# Column: (required, accepted types, what to write instead). The types the readers accept; a writer
# writes the embedding_schema ones.
COLUMN_TYPES = {
    "id": (True, _is_text, "string"),
    "embedding": (True, _is_embedding, "a fixed-size list of float32 or float16 (one length for every row)"),
    "label": (True, pa.types.is_integer, "an integer type (int32; -1 where unknown)"),
    "label_source": (False, _is_text, "string ('human' or 'teacher')"),
    "confidence": (False, pa.types.is_floating, "float32"),
    "source": (False, _is_text, "string"),
    "uri": (False, _is_text, "string"),
}


def schema_problems(s: pa.Schema) -> list[tuple[str, str]]:
    """``[(column, reason)]``: how a Parquet schema (a footer's) breaks the embedding-shard contract; none: [].

    Row contents (NaN, norms, labels outside the classes, duplicate ids) are not in a footer; the
    build checks them row by row (``memory.items``).
    """
    out = []
    for name, (required, ok, want) in COLUMN_TYPES.items():
        if name not in s.names:
            if required:
                out.append((name, f"missing: not an embedding shard (columns: {', '.join(s.names) or 'none'})"))
        elif not ok(s.field(name).type):
            out.append((name, f"is {s.field(name).type}, must be {want}"))
    return out


def write_embeddings(path: str, table: pa.Table) -> None:
    """Write one embedding shard atomically (local temp + rename; one object on GCS)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes_atomic(path, sink.getvalue().to_pybytes())


def read_embeddings(path: str) -> dict:
    """Read an embedding shard: ``ids``, ``embeddings`` float32 ``(N, dim)``, ``labels``, provenance.

    Raises:
        ValueError: a missing column, an embedding column that is not a fixed-size float list.
    """
    fs, p = storage.filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"embedding shard not found: {path}")
    with fs.open(p, "rb") as f:
        table = pq.read_table(f)
    missing = [c for c in ("id", "embedding", "label") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not an embedding shard, missing column(s) {missing}")
    col = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) or not pa.types.is_floating(col.type.value_type):
        raise ValueError(f"{path}: column 'embedding' must be a fixed-size list of floats, got {col.type}")
    dim = col.type.list_size
    values = col.flatten().to_numpy(zero_copy_only=False)
    out = {
        "ids": np.asarray(table.column("id").to_pylist(), dtype=object),
        "embeddings": values.astype(np.float32).reshape(len(table), dim),
        "labels": table.column("label").to_numpy().astype(np.int64),
        "metadata": {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()},
    }
    n = len(table)
    defaults = default_provenance(n)
    out["provenance"] = {
        c: (np.asarray(table.column(c).to_pylist(), dtype=object) if c in table.column_names else defaults[c])
        for c in PROVENANCE_COLUMNS
    }
    out["provenance"]["confidence"] = np.asarray(out["provenance"]["confidence"], dtype=np.float32)
    return out


def items_table(ids, labels, weights, provenance) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array(np.asarray(ids, dtype=object), pa.string()),
            pa.array(np.asarray(labels, dtype=np.int32)),
            pa.array(np.asarray(weights, dtype=np.float32)),
            pa.array(np.asarray(provenance["label_source"], dtype=object), pa.string()),
            pa.array(np.asarray(provenance["confidence"], dtype=np.float32)),
            pa.array(np.asarray(provenance["source"], dtype=object), pa.string()),
            pa.array(np.asarray(provenance["uri"], dtype=object), pa.string()),
        ],
        schema=ITEMS_SCHEMA,
    )


def shard_files(path) -> list[str]:
    """The embedding shards at ``path`` (or at each of a list of paths), local or ``gs://``: a file,
    a folder's top-level ``*.parquet`` files, or a glob's matches; sorted within each path.

    Raises:
        FileNotFoundError: a path that matches nothing (every shard lister, builds included, uses this).
    """
    out = []
    for one in [path] if isinstance(path, str) else list(path):
        fs, p = storage.filesystem(one)
        if any(ch in p for ch in "*?["):
            pattern = one
        elif fs.isdir(p):
            pattern = storage.join(one, "*.parquet")
        elif fs.exists(p):
            out.append(one)
            continue
        else:
            raise FileNotFoundError(f"embedding shard not found: {one}")
        files = storage.find_files(pattern)
        if not files:
            raise FileNotFoundError(f"no embedding shards match {pattern}")
        out += files
    return out


def read_embedding_shards(path) -> dict:
    """:func:`read_embeddings` over every shard at ``path`` (file, folder or glob), concatenated."""
    return concat_embeddings([read_embeddings(f) for f in shard_files(path)], where=str(path))


def concat_embeddings(parts: list[dict], where: str = "the embedding shards") -> dict:
    """One :func:`read_embeddings` result from several, in order (the first one's metadata).

    Raises:
        ValueError: no parts, or parts that disagree on the dimension.
    """
    if not parts:
        raise ValueError(f"no embedding shards to concatenate at {where}")
    if len(parts) == 1:
        return parts[0]
    dims = {p["embeddings"].shape[1] for p in parts}
    if len(dims) > 1:
        raise ValueError(f"embedding shards at {where} disagree on the dimension: {sorted(dims)}")
    return {
        "ids": np.concatenate([p["ids"] for p in parts]),
        "embeddings": np.concatenate([p["embeddings"] for p in parts]),
        "labels": np.concatenate([p["labels"] for p in parts]),
        "metadata": parts[0]["metadata"],
        "provenance": {c: np.concatenate([p["provenance"][c] for p in parts]) for c in PROVENANCE_COLUMNS},
    }
