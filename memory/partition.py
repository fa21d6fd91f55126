"""Shard assignment: which shard an item lives in, and the one helper for shard ranges."""
from __future__ import annotations

import hashlib

import numpy as np


def hash_partition(ids, num_shards: int) -> np.ndarray:
    """Shard of each id by a stable hash (the same on every machine, run and Python version)."""
    if int(num_shards) < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") % num_shards
         for i in ids),
        dtype=np.int64,
        count=len(ids),
    )


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` items are cut into ``parts`` near-equal parts."""
    return n * index // parts, n * (index + 1) // parts
