"""Image sources split into input shards: IDX (Fashion-MNIST, MNIST), image folders, WebDataset tars, Parquet.

A source is described by a small picklable :class:`SourceSpec`; :func:`open_source` turns it into a
:class:`Source` that lists its :class:`InputShard` s (on the driver) and reads one shard's records (on a
worker). An input shard is the unit of work and of resumption: the pipeline writes exactly one output
file per input shard, so its definition must be stable across re-runs of the same command.

Every record carries a stable, globally unique ``id`` (``SOURCE_NAME/...``), the ``uri`` it came
from, its human ``label`` (-1 when unknown or hidden) and, when the label was hidden on purpose
(``unlabelled_fraction``), the hidden ``true_label`` kept aside for measuring pseudo-label accuracy.
Paths may be local or ``gs://`` URLs (fsspec/gcsfs).
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import gzip
import io
import json
import posixpath
import tarfile
import zlib

import numpy as np

from memory import storage

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
KINDS = ("idx", "folder", "webdataset", "parquet")
# WebDataset members that hold the image, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "img")
IDX_PREFIXES = {"train": "train", "test": "t10k"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped, local or ``gs://``): the MNIST family's array format."""
    return parse_idx(storage.read_bytes(path), path)


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, body has {body.size} bytes")
    return body.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file (``.gz``) or a plain one: used to cut real subsets."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    storage.write_bytes_atomic(path, gzip.compress(data, 1) if path.endswith(".gz") else data)


def fashion_mnist(split: str = "train", root: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of the ``train`` or ``test`` split."""
    images_path, labels_path = idx_paths(root, split)
    return _cached_idx(images_path), _cached_idx(labels_path).astype(np.int64)


def idx_paths(root: str, split: str) -> tuple[str, str]:
    """The images and labels files of ``split`` under an MNIST-style directory (``.gz`` or plain)."""
    prefix = IDX_PREFIXES.get(split)
    if prefix is None:
        raise ValueError(f"split must be one of {', '.join(IDX_PREFIXES)}, got {split!r}")
    for ext in (".gz", ""):
        images = storage.join(root, f"{prefix}-images-idx3-ubyte{ext}")
        if storage.exists(images):
            labels = storage.join(root, f"{prefix}-labels-idx1-ubyte{ext}")
            return images, (labels if storage.exists(labels) else "")
    hint = " (install it with 'apt-get install dataset-fashion-mnist')" if root == FASHION_MNIST_DIR else ""
    raise FileNotFoundError(f"no IDX images for split {split!r} in {root}: expected "
                            f"{prefix}-images-idx3-ubyte[.gz]{hint}")


@functools.lru_cache(maxsize=4)
def _cached_idx(path: str) -> np.ndarray:
    """IDX arrays are read once per process: every input shard of a split slices the same array."""
    arr = read_idx(path)
    arr.flags.writeable = False
    return arr


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

    def resolved(self) -> "SourceSpec":
        """Check the spec at the door; fill in ``kind`` and ``name``. Raises on a missing source."""
        uri = FASHION_MNIST_DIR if self.uri == "fashion-mnist" else self.uri.rstrip("/")
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if not 0.0 <= self.unlabelled_fraction <= 1.0:
            raise ValueError(f"unlabelled fraction must be in [0, 1], got {self.unlabelled_fraction}")
        if not storage.exists(uri):
            raise FileNotFoundError(f"source not found: {self.uri}")
        kind = detect_kind(uri) if self.kind == "auto" else self.kind
        if kind not in KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}; choose auto or one of {', '.join(KINDS)}")
        name = self.name or _default_name(uri, kind)
        return dataclasses.replace(self, uri=uri, kind=kind, name=name)


def _default_name(uri: str, kind: str) -> str:
    base = posixpath.basename(uri.rstrip("/"))
    if kind in ("webdataset", "parquet") and "." in base and not _isdir(uri):
        base = posixpath.basename(posixpath.dirname(uri.rstrip("/"))) or base.split(".")[0]
    return base or "source"


def _isdir(uri: str) -> bool:
    fs, p = storage.filesystem(uri)
    return fs.isdir(p)


def _files(uri: str) -> list[str]:
    """Every file under ``uri`` (recursively), as full paths/URLs, sorted; hidden names left out."""
    fs, p = storage.filesystem(uri)
    if not fs.isdir(p):
        return [uri]
    fs.invalidate_cache(p)
    out = []
    for f in fs.find(p):
        rel = posixpath.relpath(f, p)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append(storage.join(uri, rel))
    return sorted(out)


def detect_kind(uri: str) -> str:
    """``idx`` for an MNIST-style directory, ``webdataset`` for tars, ``parquet``, else ``folder``."""
    lower = uri.lower()
    if lower.endswith(".tar"):
        return "webdataset"
    if lower.endswith(".parquet"):
        return "parquet"
    if not _isdir(uri):
        raise ValueError(f"cannot tell the kind of source {uri}: a single file must be a .tar or .parquet; "
                         "pass a directory, or --source-kind")
    names = storage.list_names(uri)
    if any(n.endswith(("-images-idx3-ubyte", "-images-idx3-ubyte.gz")) for n in names):
        return "idx"
    if names and all(n.endswith(".tar") for n in names if not n.startswith(".")):
        return "webdataset"
    if names and all(n.endswith(".parquet") for n in names if not n.startswith(".")):
        return "parquet"
    return "folder"


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
        return f"shard-{self.index:05d}-of-{self.count:05d}"


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


class IdxSource(Source):
    """An MNIST-family directory: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; rows are pixels."""

    @property
    def class_names(self) -> list[str]:
        if posixpath.basename(self.spec.uri) == "fashion-mnist":
            return list(FASHION_MNIST_CLASSES)
        return [str(i) for i in range(10)]

    def _arrays(self):
        images_path, labels_path = idx_paths(self.spec.uri, self.spec.split)
        images = _cached_idx(images_path)
        labels = _cached_idx(labels_path) if labels_path else None
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{labels_path} has {len(labels)} labels for {len(images)} images")
        return images, labels, images_path

    def shards(self) -> list[InputShard]:
        images, _, _ = self._arrays()
        n = min(len(images), self.spec.limit or len(images))
        bounds = shard_bounds(n, self.spec.shard_size)
        return [InputShard(i, len(bounds), ((a, b),), b - a) for i, (a, b) in enumerate(bounds)]

    def read(self, shard: InputShard):
        images, labels, images_path = self._arrays()
        (a, b), = shard.items
        for i in range(a, b):
            rid = f"{self.spec.name}/{self.spec.split}/{i:05d}"
            yield self._record(rid, f"{images_path}#{i}", -1 if labels is None else int(labels[i]), images[i])


class FolderSource(Source):
    """A directory of image files; with sub-folders, each top-level sub-folder is a class (sorted names)."""

    @functools.cached_property
    def _listing(self) -> list[str]:
        return [posixpath.relpath(f, self.spec.uri) for f in _files(self.spec.uri)]

    @functools.cached_property
    def class_names(self) -> list[str]:
        return sorted({rel.split("/")[0] for rel in self._listing if "/" in rel})

    def shards(self) -> list[InputShard]:
        if not self._listing:
            raise ValueError(f"source {self.spec.uri} holds no files")
        return self._cut(self._listing)

    def read(self, shard: InputShard):
        classes = {c: i for i, c in enumerate(self.class_names)}
        fs, root = storage.filesystem(self.spec.uri)
        for rel in shard.items:
            label = classes[rel.split("/")[0]] if "/" in rel else -1
            uri = storage.join(self.spec.uri, rel)
            try:
                with fs.open(f"{root}/{rel}", "rb") as f:
                    payload = f.read()
            except OSError as exc:  # unreadable file: the decoder quarantines it with this reason
                payload = exc
            yield self._record(f"{self.spec.name}/{rel}", uri, label, payload)


class WebDatasetSource(Source):
    """WebDataset-style tars: members grouped by key (path up to the first dot of the basename);
    the image is the first member with an image extension, the label a ``.cls`` integer or a
    ``.json`` object's ``label``. Each tar is one input shard."""

    def shards(self) -> list[InputShard]:
        if self.spec.limit:
            raise ValueError("--limit is not supported for WebDataset sources (their sample counts are only "
                             "known by reading every tar); pass fewer tar files instead")
        tars = [f for f in _files(self.spec.uri) if f.endswith(".tar")]
        if not tars:
            raise ValueError(f"source {self.spec.uri} holds no .tar files")
        return [InputShard(i, len(tars), (t,)) for i, t in enumerate(tars)]

    def read(self, shard: InputShard):
        (tar_uri,) = shard.items
        tar_name = posixpath.basename(tar_uri)
        samples: dict[str, dict] = {}
        order: list[str] = []
        fs, p = storage.filesystem(tar_uri)
        try:
            with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    d, base = posixpath.split(member.name)
                    if base.startswith("."):
                        continue
                    key, _, ext = base.partition(".")
                    key = posixpath.join(d, key)
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    samples[key][ext.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            # A broken tar: the samples read before the break are kept, the rest is one quarantined record.
            yield Record(f"{self.spec.name}/{tar_name}", tar_uri, -1, -1, OSError(f"unreadable tar: {exc}"))
        for key in order:
            members = samples[key]
            image = next((members[e] for e in WDS_IMAGE_EXTS if e in members), None)
            if image is None:
                image = ValueError(f"no image member in sample (members: {', '.join(sorted(members))})")
            yield self._record(f"{self.spec.name}/{tar_name}/{key}", f"{tar_uri}#{key}", _wds_label(members),
                               image)


def _wds_label(members: dict) -> int:
    if "cls" in members:
        return int(members["cls"].decode().strip())
    if "json" in members:
        value = json.loads(members["json"]).get("label", -1)
        return int(value) if value is not None else -1
    return -1


class ParquetSource(Source):
    """Parquet files with an image-bytes column (binary, or a struct with ``bytes`` as Hugging Face
    datasets store images), an optional integer label column and an optional ``id`` column."""

    def shards(self) -> list[InputShard]:
        import pyarrow.parquet as pq

        files = [f for f in _files(self.spec.uri) if f.endswith(".parquet")]
        if not files:
            raise ValueError(f"source {self.spec.uri} holds no .parquet files")
        pieces = []
        for f in files:
            fs, p = storage.filesystem(f)
            with fs.open(p, "rb") as fh:
                meta = pq.ParquetFile(fh)
                names = meta.schema_arrow.names
                n = meta.metadata.num_rows
            if self.spec.image_column not in names:
                raise ValueError(f"{f}: no image column {self.spec.image_column!r} (columns: {', '.join(names)}); "
                                 "pass --image-column")
            pieces += [(f, a, b) for a, b in shard_bounds(n, self.spec.shard_size)]
        if self.spec.limit:
            kept, left = [], self.spec.limit
            for f, a, b in pieces:
                if left <= 0:
                    break
                kept.append((f, a, min(b, a + left)))
                left -= kept[-1][2] - a
            pieces = kept
        return [InputShard(i, len(pieces), piece, piece[2] - piece[1]) for i, piece in enumerate(pieces)]

    def read(self, shard: InputShard):
        import pyarrow.parquet as pq

        f, a, b = shard.items
        fs, p = storage.filesystem(f)
        with fs.open(p, "rb") as fh:
            table = pq.read_table(fh).slice(a, b - a)
        images = table.column(self.spec.image_column).to_pylist()
        labels = (table.column(self.spec.label_column).to_pylist() if self.spec.label_column in table.column_names
                  else [None] * len(table))
        ids = table.column("id").to_pylist() if "id" in table.column_names else None
        base = posixpath.basename(f)
        for j, (img, label) in enumerate(zip(images, labels)):
            row = a + j
            rid = f"{self.spec.name}/{ids[j]}" if ids else f"{self.spec.name}/{base}/{row}"
            if isinstance(img, dict):
                img = img.get("bytes")
            yield self._record(rid, f"{f}#{row}", -1 if label is None else int(label), img if img is not None
                               else b"")


SOURCES = {"idx": IdxSource, "folder": FolderSource, "webdataset": WebDatasetSource, "parquet": ParquetSource}


def open_source(spec: SourceSpec) -> Source:
    """A :class:`Source` for a spec (resolved first: a missing path fails here, naming it)."""
    spec = spec.resolved()
    return SOURCES[spec.kind](spec)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image: used to write real images into folder/tar/Parquet sources."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()

