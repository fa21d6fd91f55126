"""Shards hosted in Ray actors, for memories larger than one machine.

Each actor opens its shard once (the worker downloads and loads the index; nothing heavy crosses a
process boundary but the path and the manifest entry) and answers top-k searches. A
:class:`RemoteShard` proxy has the same ``search_rows``/``take``/``exclude``/``live_count`` surface as a local
:class:`memory.shard.Shard`, so the memory's fan-out (threads that wait on the actors) and its merge
are exactly those of the in-process path.
"""
from __future__ import annotations

import numpy as np

from memory.manifest import ShardEntry
from memory.shard import Shard


class ShardHost:
    """The actor body: one opened shard."""

    def __init__(self, root: str, entry: ShardEntry, verify: bool = True):
        self.shard = Shard.open(root, entry, verify=verify)

    def search(self, queries: np.ndarray, k: int, knobs: dict):
        return self.shard.search(queries, k, **knobs)

    def search_rows(self, queries: np.ndarray, k: int, knobs: dict):
        return self.shard.search_rows(queries, k, **knobs)

    def take(self, rows: np.ndarray):
        return self.shard.take(rows)

    def exclude(self, ids) -> int:
        return self.shard.exclude(ids)

    def sizes(self) -> tuple[int, int]:
        return len(self.shard.ids), self.shard.live_count


class RemoteShard:
    """A proxy for a :class:`ShardHost` actor, usable wherever the memory uses a local shard."""

    def __init__(self, actor, entry: ShardEntry):
        self.actor = actor
        self.entry = entry
        self.name = entry.name

    def search(self, queries, k, **knobs):
        import ray

        return ray.get(self.actor.search.remote(queries, k, knobs))

    def search_rows(self, queries, k, **knobs):
        """``(sims, rows)``: only numbers cross the process boundary; ids come via :meth:`take`."""
        import ray

        return ray.get(self.actor.search_rows.remote(queries, k, knobs))

    def take(self, rows):
        import ray

        return ray.get(self.actor.take.remote(rows))

    def exclude(self, ids) -> int:
        import ray

        return ray.get(self.actor.exclude.remote(list(ids)))

    @property
    def live_count(self) -> int:
        import ray

        return ray.get(self.actor.sizes.remote())[1]


def open_remote_shards(root: str, entries: list[ShardEntry], *, verify: bool = True, num_cpus: float | None = None) -> list:
    """Start one actor per shard on the connected Ray cluster; wait until every shard is loaded.

    ``num_cpus`` per actor defaults to an equal share of the cluster's CPUs (at most 1), so every
    shard gets an actor even when there are more shards than CPUs.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init(address=...) first (vismem does with --ray-address)")
    if num_cpus is None:
        num_cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / max(len(entries), 1))
    host = ray.remote(num_cpus=num_cpus)(ShardHost)
    actors = [host.remote(root, e, verify) for e in entries]
    ray.get([a.sizes.remote() for a in actors])  # surfaces a corrupt or missing shard now, by name
    return [RemoteShard(a, e) for a, e in zip(actors, entries)]
