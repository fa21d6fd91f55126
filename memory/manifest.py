"""The memory manifest: the versioned document that says what a memory is (the one place for it).

A memory directory (local or ``gs://``) looks like::

    MEMORY/
      manifests/v00000001.json          # written last: a version exists once its manifest does
      shards/v00000001/shard-00000-of-00004/{items.parquet, embeddings.npy, index/...}

A manifest records the format version, encoder, dimension, metric, class names, partitioning, and
every shard with its path (relative to the memory), item count, backend and file checksums. A new
version is published by writing a new manifest; readers pin the version they opened.
"""
from __future__ import annotations

import json
import re
import time

from memory import storage

FORMAT = "vismem-memory"
FORMAT_VERSION = 1
# A version that records removals (tombstones, the forget list) is format 2, so that a reader that
# knows nothing of removals refuses it instead of showing removed items again.
REMOVALS_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION, REMOVALS_FORMAT_VERSION)
MANIFESTS = "manifests"
_NAME = re.compile(r"^v(\d{8})\.json$")


class MemoryFormatError(ValueError):
    """A memory that is partial, corrupt or of an unknown format."""


def manifest_path(root: str, version: int) -> str:
    return storage.join(root, MANIFESTS, f"v{version:08d}.json")


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def list_versions(root: str) -> list[int]:
    names = storage.list_names(storage.join(root, MANIFESTS))
    return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)


def latest_version(root: str) -> int | None:
    versions = list_versions(root)
    return versions[-1] if versions else None


def new_manifest(*, version, dim, class_names, backend, shards, encoder=None, partitioning=None,
                 parent_version=None, change="write", extra=None) -> dict:
    extra = extra or {}
    removals = bool(extra.get("tombstones") or extra.get("forget"))
    return {
        "format": FORMAT,
        "format_version": REMOVALS_FORMAT_VERSION if removals else FORMAT_VERSION,
        "version": int(version),
        "parent_version": parent_version,
        "created_unix": time.time(),
        "change": change,
        "encoder": encoder or {},
        "dim": int(dim),
        "metric": "cosine",
        "class_names": list(class_names),
        "backend": backend,
        "partitioning": partitioning or {"method": "hash"},
        "shards": shards,
        "count": int(sum(s["count"] for s in shards)),
        **extra,
    }


def write_manifest(root: str, manifest: dict) -> str:
    """Publish a version: the manifest is the last file written, atomically."""
    path = manifest_path(root, manifest["version"])
    if storage.exists(path):
        raise MemoryFormatError(f"{path} already exists: version {manifest['version']} is published")
    storage.write_bytes_atomic(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return path


def read_manifest(root: str, version: int | None = None) -> dict:
    """Read and check the manifest of ``version`` (default: the latest).

    Raises:
        FileNotFoundError: no memory at ``root``, or no such version.
        MemoryFormatError: unreadable JSON, another format, or a newer format version.
    """
    if version is None:
        version = latest_version(root)
        if version is None:
            if storage.exists(root):
                raise FileNotFoundError(
                    f"{root} holds no published memory (no {MANIFESTS}/v*.json): "
                    "it is missing or a write did not finish"
                )
            raise FileNotFoundError(f"no memory at {root}")
    path = manifest_path(root, version)
    if not storage.exists(path):
        raise FileNotFoundError(f"memory {root} has no version {version} (versions: {list_versions(root)})")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemoryFormatError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise MemoryFormatError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise MemoryFormatError(
            f"{path} has format version {manifest.get('format_version')}; this vismem reads versions "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. Upgrade vismem or rebuild the memory."
        )
    for key in ("dim", "class_names", "shards", "backend"):
        if key not in manifest:
            raise MemoryFormatError(f"{path} lacks the field {key!r}")
    return manifest
