"""A memory's manifest in brief: version, format, backend, size, classes and shards."""
from __future__ import annotations

from memory import manifest as mf


def memory_info(memory_path: str, version: int | None = None) -> dict:
    """The summary ``vismem info`` prints for ``version`` (default: the latest) of the memory at ``memory_path``."""
    m = mf.read_manifest(memory_path, version)
    return {
        "memory": memory_path, "version": m.version, "versions": mf.list_versions(memory_path),
        "format_version": m.format_version, "backend": m.backend, "dim": m.dim,
        "count": m.count, "classes": len(m.class_names), "encoder": m.encoder,
        "shards": [{"name": s.name, "count": s.count, "params": s.params} for s in m.shards],
    }
