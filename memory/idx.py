"""The IDX codec (the MNIST family's array format, optionally gzipped): parse, read and write uint8 arrays."""
from __future__ import annotations

import gzip

import numpy as np

from memory import storage


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """The uint8 array in IDX ``data`` (gunzipped first when ``path`` ends in ``.gz``).

    Raises:
        ValueError: not an unsigned-byte IDX file, or a body shorter or longer than its header says.
    """
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


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (local or ``gs://``; gzipped when its name ends in ``.gz``)."""
    return parse_idx(storage.read_bytes(path), path)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, gzipped when ``path`` ends in ``.gz`` (atomically)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    storage.write_bytes_atomic(path, gzip.compress(data, 1) if path.endswith(".gz") else data)
