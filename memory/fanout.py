"""Executors that run one function over every shard: the pluggable half of the fan-out query layer.

An executor has one method, ``map(fn, shards) -> list`` in shard order. Threads serve one process
(the backends release the GIL in their matrix products and ScaNN calls); a Ray executor that hosts
shards in actors plugs in the same way.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


class SerialFanout:
    """Shards one after another in the caller's thread (each backend still uses all cores)."""

    def map(self, fn, shards):
        return [fn(s) for s in shards]

    def close(self):
        """Nothing to release: no threads of its own."""


class ThreadFanout:
    """Shards in parallel on a thread pool (default: one thread per core, at most one per shard)."""

    def __init__(self, max_workers: int | None = None):
        self.max_workers = max_workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="vismem-shard")

    def map(self, fn, shards):
        if len(shards) <= 1:
            return [fn(s) for s in shards]
        return list(self._pool.map(fn, shards))

    def close(self):
        self._pool.shutdown(wait=True)
