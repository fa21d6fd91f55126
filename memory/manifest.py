"""The memory manifest: the versioned document that says what a memory is (the one place for it).

A memory directory (local or ``gs://``) looks like::

    MEMORY/
      manifests/v00000001.json        # written last: a version exists once its manifest does
      manifests/v00000001.retired     # gc deleted the version's files (its manifest became a stub)
      shards/v00000001/shard-00000-of-00004/{items.parquet, embeddings.npy, scann/}
      shards/v00000002.TOKEN/shard-00000-of-00004.ATTEMPT/...   # Beam builds, adds and compactions
      state/v00000002.TOKEN/{tombstones.parquet, forget.parquet} # removals (memory.removals)
      deadletter/v00000001.TOKEN.parquet                         # rows a Beam build rejected
      leases/v00000001-ID.json                                   # readers holding a version

A manifest records the format version, encoder, dimension, metric, class names, partitioning, and
every shard with its path (relative to the memory), item count, backend and file checksums; versions
derived from another one record their parent, the change, and the removal state. A new version is
published by creating its manifest only if absent (:func:`publish`: of two writers deriving one
version exactly one wins, the other gets :class:`ConcurrentUpdate`); readers pin the version they opened.
A version's manifest is never deleted: ``vismem gc`` retires it (:func:`retire`), so its name stays
taken and a writer that derived it from a long-gone parent cannot publish it again.
"""
from __future__ import annotations

import dataclasses
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
_RETIRED = re.compile(r"^v(\d{8})\.retired$")
_SHARD_NAME = re.compile(r"^shard-(\d{5})-of-(\d{5})")
_OPTIONAL = {"optional": True}  # field metadata: left out of the JSON when None


class MemoryFormatError(ValueError):
    """A memory that is partial, corrupt or of an unknown format."""


class VersionRetired(FileNotFoundError):
    """A version whose files ``vismem gc`` deleted (its manifest is kept as a stub)."""


def manifest_path(root: str, version: int) -> str:
    return storage.join(root, MANIFESTS, f"v{version:08d}.json")


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def shard_dir(version: int, name: str, *, token: str | None = None, attempt: str | None = None) -> str:
    """A shard's folder relative to the memory: ``shards/vNNNNNNNN[.TOKEN]/NAME[.ATTEMPT]``.

    ``token`` keeps two runs at one version apart, ``attempt`` two tries at one shard (Beam retries).
    """
    top = f"v{int(version):08d}" + (f".{token}" if token else "")
    return f"shards/{top}/{name}" + (f".{attempt}" if attempt else "")


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """``(index, count)`` of a name :func:`shard_name` made (suffixes allowed); None for another name."""
    m = _SHARD_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _slots(root: str) -> tuple[list[int], set[int]]:
    """Every version ever published (sorted) and the retired ones, from one listing."""
    names = storage.list_names(storage.join(root, MANIFESTS))
    published = sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)
    return published, {int(m.group(1)) for m in map(_RETIRED.match, names) if m}


def list_versions(root: str) -> list[int]:
    """The versions that can be opened (published and not retired by gc), oldest first."""
    published, retired = _slots(root)
    return [v for v in published if v not in retired]


def latest_version(root: str) -> int | None:
    """The newest published version (gc never retires it), or None for no memory."""
    published, _ = _slots(root)
    return published[-1] if published else None


def _retired_path(root: str, version: int) -> str:
    return storage.join(root, MANIFESTS, f"v{int(version):08d}.retired")


def retire(root: str, version: int) -> None:
    """Mark ``version`` deleted by gc, then shrink its manifest to a stub; never delete the name.

    The manifest's name must stay taken: a writer that derived this version from a parent long
    gone would otherwise publish it again (create-if-absent succeeds on a free name) and its change
    would land below the latest version, lost. The marker comes first, so a crash between the two
    steps leaves a retired version with a full manifest, never a live one with a stub.
    """
    storage.write_bytes_atomic(_retired_path(root, version),
                               json.dumps({"retired_at": time.time()}).encode())
    stub = {"format": FORMAT, "version": int(version), "retired": True}
    storage.write_bytes_atomic(manifest_path(root, version), json.dumps(stub).encode())  # replace: never absent


# ---- typed reading: every value checked against its declared type, the field named on error ----------

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}


def _typed(value, kind, where: str, field: str):
    ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
    if not ok:
        raise MemoryFormatError(f"{where}: field {field!r} must be {_TYPE_NAMES[kind]}, got {type(value).__name__}")
    return value


def _fields(cls, d, where: str, kinds: dict, nested: dict | None = None) -> dict:
    """Constructor arguments of ``cls`` from a JSON object: unknown keys refused, types checked."""
    if not isinstance(d, dict):
        raise MemoryFormatError(f"{where} must be an object, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise MemoryFormatError(f"{where} has unknown field(s) {unknown}")
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            if f.metadata.get("optional"):
                continue
            raise MemoryFormatError(f"{where} lacks the field {f.name!r}")
        value = d[f.name]
        if value is None and (f.metadata.get("optional") or f.default is None):
            out[f.name] = None
        elif nested and f.name in nested:
            out[f.name] = nested[f.name](value, f"{where}: field {f.name!r}")
        else:
            out[f.name] = _typed(value, kinds[f.name], where, f.name)
    return out


def _json(obj) -> dict:
    """A typed object's JSON form: optional fields that are None are left out."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.metadata.get("optional"):
            continue
        out[f.name] = value.to_json() if hasattr(value, "to_json") else value
    return out


@dataclasses.dataclass(frozen=True)
class StateRef:
    """A removal-state file (``memory.removals``): path relative to the memory, rows, size and checksum."""

    path: str
    count: int
    bytes: int
    sha256: str

    @classmethod
    def from_json(cls, d, where: str = "state entry") -> "StateRef":
        return cls(**_fields(cls, d, where, {"path": str, "count": int, "bytes": int, "sha256": str}))

    def to_json(self) -> dict:
        return _json(self)


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One shard of a version: its folder (relative to the memory), items, backend and file checksums."""

    name: str
    path: str
    count: int
    backend: str
    params: dict
    files: dict  # {relative file: {"sha256", "bytes"}}
    partition: int | None = dataclasses.field(default=None, metadata=_OPTIONAL)
    build_seconds: float | None = dataclasses.field(default=None, metadata=_OPTIONAL)

    @classmethod
    def from_json(cls, d, where: str = "shard entry") -> "ShardEntry":
        kinds = {"name": str, "path": str, "count": int, "backend": str, "params": dict, "files": dict,
                 "partition": int, "build_seconds": float}
        entry = cls(**_fields(cls, d, where, kinds))
        for rel, want in entry.files.items():
            if not isinstance(want, dict) or not isinstance(want.get("sha256"), str) \
                    or not isinstance(want.get("bytes"), int):
                raise MemoryFormatError(f"{where}: field 'files' entry {rel!r} must hold sha256 and bytes")
        return entry

    def to_json(self) -> dict:
        return _json(self)

    @property
    def partition_number(self) -> int:
        """The partition (hash bucket or k-means group) the shard holds: recorded, or from its name."""
        if self.partition is not None:
            return self.partition
        parsed = parse_shard_name(self.name)
        if parsed is None:
            raise MemoryFormatError(f"shard {self.name!r} names no partition")
        return parsed[0]


@dataclasses.dataclass(frozen=True)
class Partitioning:
    """How items are assigned to shards: by ``hash`` of id, or by nearest ``kmeans`` cell."""

    method: str
    num_shards: int | None = dataclasses.field(default=None, metadata=_OPTIONAL)
    centroids: list | None = dataclasses.field(default=None, metadata=_OPTIONAL)  # (cells, dim) unit rows
    cell_partitions: list | None = dataclasses.field(default=None, metadata=_OPTIONAL)  # shard of each cell

    @classmethod
    def from_json(cls, d, where: str = "partitioning") -> "Partitioning":
        kinds = {"method": str, "num_shards": int, "centroids": list, "cell_partitions": list}
        p = cls(**_fields(cls, d, where, kinds))
        if p.cell_partitions is not None and len(p.cell_partitions) != len(p.centroids or ()):
            raise MemoryFormatError(f"{where}: {len(p.cell_partitions)} cell partitions for "
                                    f"{len(p.centroids or ())} centroids")
        return p

    def to_json(self) -> dict:
        return _json(self)


def _shards(value, where: str) -> list:
    if not isinstance(value, list):
        raise MemoryFormatError(f"{where} must be a list, got {type(value).__name__}")
    return [ShardEntry.from_json(e, f"{where}[{i}]") for i, e in enumerate(value)]


def _typed_arg(value, kind, what: str):
    """``value`` if it is a ``kind`` (or None); :meth:`Manifest.new` takes typed parts only."""
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{what} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _class_names(value, where: str) -> list:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise MemoryFormatError(f"{where} must be a list of strings")
    return value


@dataclasses.dataclass(frozen=True)
class Manifest:
    """One published version of a memory. ``from_json(d).to_json() == d`` for every valid manifest."""

    version: int
    dim: int
    class_names: list
    backend: str
    shards: list  # [ShardEntry]
    count: int
    created_unix: float
    parent_version: int | None = None  # always written (null for a first version)
    change: str = "write"
    encoder: dict = dataclasses.field(default_factory=dict)  # memory.encoder_spec.EncoderSpec's form
    partitioning: Partitioning = dataclasses.field(default_factory=lambda: Partitioning("hash"))
    metric: str = "cosine"
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    # Extensions: left out when None.
    change_detail: dict | None = dataclasses.field(default=None, metadata=_OPTIONAL)
    build: dict | None = dataclasses.field(default=None, metadata=_OPTIONAL)  # backend_params, storage_dtype
    tombstones: StateRef | None = dataclasses.field(default=None, metadata=_OPTIONAL)
    forget: StateRef | None = dataclasses.field(default=None, metadata=_OPTIONAL)
    removed_count: int | None = dataclasses.field(default=None, metadata=_OPTIONAL)

    @classmethod
    def new(cls, *, version, dim, class_names, backend, shards, encoder=None, partitioning=None,
            parent_version=None, change="write", change_detail=None, build=None, tombstones=None,
            forget=None, removed_count=None) -> "Manifest":
        """A new version's manifest: item count from its shards, format version from its removal state.

        Only declared fields are accepted (Python refuses any other keyword).

        Raises:
            TypeError: a shard that is not a :class:`ShardEntry`, partitioning that is not a
                :class:`Partitioning` (None: hash), or removal state that is not a :class:`StateRef`.
        """
        shards = [_typed_arg(e, ShardEntry, "each shard") for e in shards]
        state = {"tombstones": _typed_arg(tombstones, StateRef, "tombstones"),
                 "forget": _typed_arg(forget, StateRef, "forget")}
        return cls(
            format_version=REMOVALS_FORMAT_VERSION if tombstones or forget else FORMAT_VERSION,
            version=int(version), parent_version=parent_version, created_unix=time.time(), change=change,
            encoder=dict(encoder or {}), dim=int(dim), class_names=list(class_names), backend=backend,
            partitioning=_typed_arg(partitioning, Partitioning, "partitioning") or Partitioning("hash"),
            shards=shards, count=int(sum(s.count for s in shards)),
            change_detail=change_detail, build=build, removed_count=removed_count, **state,
        )

    @classmethod
    def from_json(cls, d, where: str = "manifest") -> "Manifest":
        kinds = {"version": int, "dim": int, "backend": str, "count": int, "created_unix": float,
                 "parent_version": int, "change": str, "encoder": dict, "metric": str, "format": str,
                 "format_version": int, "change_detail": dict, "build": dict, "removed_count": int}
        nested = {"shards": _shards, "class_names": _class_names, "partitioning": Partitioning.from_json,
                  "tombstones": StateRef.from_json, "forget": StateRef.from_json}
        return cls(**_fields(cls, d, where, kinds, nested))

    def to_json(self) -> dict:
        out = _json(self)
        out["shards"] = [s.to_json() for s in self.shards]
        return out

    @property
    def live_count(self) -> int:
        """Items a search can return: all minus those removed but not yet compacted away."""
        return self.count - (self.removed_count or 0)

    @property
    def num_partitions(self) -> int:
        return int(self.partitioning.num_shards or len(self.shards))

    def referenced_paths(self) -> set[str]:
        """Paths (relative to the memory) this version needs: its shard folders and state files."""
        refs = {e.path for e in self.shards}
        return refs | {s.path for s in (self.tombstones, self.forget) if s}


class ConcurrentUpdate(RuntimeError):
    """Another writer published the version this one meant to publish: re-derive from the latest."""

    def __init__(self, root: str, version: int, winner: str = "another writer"):
        super().__init__(f"version {version} of {root} was published meanwhile by {winner}; "
                         "nothing of this change was published")
        self.root, self.version = root, version


def _winner(data: bytes | None) -> str:
    """Who published a manifest, in words (its change and parent), for :class:`ConcurrentUpdate`."""
    try:
        d = json.loads(data)
        if d.get("retired"):
            return "another writer (it has since been deleted by gc)"
        return f"a '{d['change']}' derived from version {d['parent_version']}"
    except (TypeError, ValueError, KeyError):
        return "another writer"


def publish(root: str, manifest: Manifest) -> str:
    """Publish a version: create its manifest only if no manifest of that version exists.

    The manifest is the last file a change writes and the only one it publishes with: locally an
    exclusive create (a hard link from a fsynced temporary), on ``gs://`` an upload with
    ``ifGenerationMatch=0`` (Cloud Storage refuses it with 412 when the object exists). So of two
    writers deriving the same version, exactly one publishes; the other gets ``ConcurrentUpdate``.
    A create whose response was lost and that was retried finds its own bytes: that counts as done.

    Returns the manifest's path.

    Raises:
        ConcurrentUpdate: the version exists (another writer won); nothing was written.
        TypeError: ``manifest`` is not a :class:`Manifest`.
    """
    if not isinstance(manifest, Manifest):
        raise TypeError(f"publish takes a Manifest, got {type(manifest).__name__}")
    path = manifest_path(root, manifest.version)
    data = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()
    try:
        storage.create_new(path, data)
    except FileExistsError:
        try:
            there = storage.read_bytes(path)
        except FileNotFoundError:
            there = None
        if there == data:
            return path
        raise ConcurrentUpdate(root, manifest.version, _winner(there)) from None
    return path


write_manifest = publish  # the name older callers use


def read_manifest(root: str, version: int | None = None) -> Manifest:
    """The manifest of ``version`` (default: the latest), every field checked.

    Raises:
        FileNotFoundError: no memory at ``root``, or no such version.
        MemoryFormatError: unreadable JSON, another format, a newer format version, or a field that
            is missing, unknown or of the wrong type (named).
    """
    pinned = version is not None  # the latest version is never retired: no marker to look for
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
        d = json.loads(storage.read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemoryFormatError(f"{path} is corrupt: {exc}") from exc
    if (isinstance(d, dict) and d.get("retired")) or (pinned and storage.exists(_retired_path(root, version))):
        raise VersionRetired(f"version {version} of {root} was deleted by `vismem gc` "
                             f"(versions that can be opened: {list_versions(root)})")
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise MemoryFormatError(f"{path} is not a {FORMAT} manifest")
    if d.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise MemoryFormatError(
            f"{path} has format version {d.get('format_version')}; this vismem reads versions "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. Upgrade vismem or rebuild the memory."
        )
    return Manifest.from_json(d, path)

