"""IDX sources (the MNIST family, read with the ``memory.idx`` codec) and Fashion-MNIST's splits."""
from __future__ import annotations

import functools
import posixpath

import numpy as np

from memory import storage, uris
from memory.idx import read_idx
from pipelines.sources.base import InputShard, Source, shard_bounds

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IDX_PREFIXES = {"train": "train", "test": "t10k"}


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
            yield self._record(rid, uris.idx_uri(images_path, i), -1 if labels is None else int(labels[i]), images[i])
