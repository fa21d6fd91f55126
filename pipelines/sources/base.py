"""What every source shares: the spec, input shards, records and the Source interface."""
from __future__ import annotations

import abc
import dataclasses
import zlib

from memory import storage
from memory.manifest import shard_name


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What to read and how to cut it. Every field changes the output, so all belong to a run's identity."""

    uri: str
    kind: str = "auto"
    name: str = ""
    split: str = "train"
    shard_size: int = 1000
    limit: int | None = None
    unlabelled_fraction: float = 0.0
    image_column: str = "image"
    label_column: str = "label"

    def check(self) -> None:
        """Raise ``ValueError`` on a size, limit or fraction out of range."""
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if not 0.0 <= self.unlabelled_fraction <= 1.0:
            raise ValueError(f"unlabelled fraction must be in [0, 1], got {self.unlabelled_fraction}")


@dataclasses.dataclass(frozen=True)
class InputShard:
    """One unit of work. ``items``: ``((start, stop),)`` rows (idx), ``(file, start, stop)`` (parquet), relative
    file paths (folder) or ``(tar,)`` (webdataset)."""

    index: int
    count: int
    items: tuple
    size: int | None = None  # number of records, when known without reading (not for tars)

    @property
    def name(self) -> str:
        return shard_name(self.index, self.count)  # the same zero-padded names as memory shards


@dataclasses.dataclass
class Record:
    id: str
    uri: str
    label: int
    true_label: int
    payload: object  # np.ndarray (already pixels) or bytes (an encoded image file)


class Source(abc.ABC):
    """Lists input shards (driver side) and reads one shard's records (worker side)."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec  # resolved by open_source; sources travel to workers as specs, cheaply

    @property
    def class_names(self) -> list[str]:
        return []

    def check(self) -> None:
        """Raise on a source that cannot be listed; :func:`open_source` calls it before any output exists.
        Sources whose listing reads the files (Parquet footers) list here, once."""

    @abc.abstractmethod
    def shards(self) -> list[InputShard]:
        """The input shards: the unit of work and of resumption."""

    @abc.abstractmethod
    def read(self, shard: InputShard):
        """Yield the :class:`Record` of every item of ``shard``."""

    def _record(self, rid: str, uri: str, label: int, payload) -> Record:
        if label >= 0 and hidden(rid, self.spec.unlabelled_fraction):
            return Record(rid, uri, -1, int(label), payload)
        return Record(rid, uri, int(label), -1, payload)

    def _cut(self, items: list) -> list[InputShard]:
        items = items[: self.spec.limit] if self.spec.limit else items
        bounds = shard_bounds(len(items), self.spec.shard_size)
        return [InputShard(i, len(bounds), tuple(items[a:b]), b - a) for i, (a, b) in enumerate(bounds)]


def hidden(record_id: str, fraction: float) -> bool:
    """Whether a record's label is hidden: a stable pseudo-random draw from its id (crc32)."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    return zlib.crc32(record_id.encode()) / 2**32 < fraction


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(i0, i1), ...]``: contiguous slices of ``n`` items, ``shard_size`` each (the last may be short)."""
    return [(i, min(n, i + shard_size)) for i in range(0, n, shard_size)]


def is_dir(uri: str) -> bool:
    fs, p = storage.filesystem(uri)
    return fs.isdir(p)

