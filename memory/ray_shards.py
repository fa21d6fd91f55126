"""Shards hosted in Ray actors, for memories larger than one machine.

Each actor opens its shard once (the worker downloads and loads the index; nothing heavy crosses a
process boundary but the path and the manifest entry) and answers top-k searches. A
:class:`RemoteShard` proxy has the same ``search_rows``/``take``/``exclude``/``live_count`` surface as a local
:class:`memory.shard.Shard`, so the memory's fan-out (threads that wait on the actors) and its merge
are exactly those of the in-process path.
"""
from __future__ import annotations

import time

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


REOPEN_TIMEOUT_S = 120.0  # how long a lost shard may take to load again on a surviving node


class ShardLost(RuntimeError):
    """A Ray-hosted shard was lost (its node died) and could not be opened again: no answer, never a wrong one."""


class RemoteShard:
    """A proxy for a :class:`ShardHost` actor, usable wherever the memory uses a local shard.

    When the actor is lost with its node, the shard is opened again in a new actor on a surviving
    node, every id excluded so far is excluded again (a new actor knows nothing of them: removed
    items would come back), and the call is repeated once; if that fails too, :class:`ShardLost`.
    Rows stay valid across the move: the same shard files give the same row order.
    """

    def __init__(self, actor, entry: ShardEntry, reopen):
        self.actor = actor
        self.entry = entry
        self.name = entry.name
        self._reopen = reopen  # () -> a new ShardHost actor for this entry
        self._excluded: list = []

    def _call(self, method: str, *args):
        import ray

        try:
            return ray.get(getattr(self.actor, method).remote(*args))
        except ray.exceptions.RayActorError as exc:
            lost = str(exc).strip().splitlines()[0]
        deadline = time.monotonic() + REOPEN_TIMEOUT_S
        while True:
            try:
                ray.kill(self.actor, no_restart=True)  # "unavailable" may be a live actor cut off: never two
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
            try:
                self.actor = self._reopen()
                left = max(1.0, deadline - time.monotonic())
                if self._excluded:
                    ray.get(self.actor.exclude.remote(self._excluded), timeout=left)
                return ray.get(getattr(self.actor, method).remote(*args), timeout=left)
            except ray.exceptions.RayActorError as exc:
                # Placed on the lost node before Ray declared it dead (seconds): place it again.
                last = exc
            except ray.exceptions.RayError as exc:  # GetTimeoutError included: no room anywhere
                last = exc
                deadline = 0.0
            if time.monotonic() >= deadline:
                raise ShardLost(f"shard {self.name} was lost with its Ray node ({lost}) and could not be "
                                f"opened again: {str(last).strip().splitlines()[0]}") from last
            time.sleep(1.0)

    def search(self, queries, k, **knobs):
        return self._call("search", queries, k, knobs)

    def search_rows(self, queries, k, **knobs):
        """``(sims, rows)``: only numbers cross the process boundary; ids come via :meth:`take`."""
        return self._call("search_rows", queries, k, knobs)

    def take(self, rows):
        return self._call("take", rows)

    def exclude(self, ids) -> int:
        ids = list(ids)
        count = self._call("exclude", ids)
        self._excluded += ids
        return count

    @property
    def live_count(self) -> int:
        return self._call("sizes")[1]


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
    # A shard opened again after its node was lost reserves no CPU: the survivors' CPUs may all be
    # reserved by the other shards, and a host that waited for one would never answer.
    again = host.options(num_cpus=0)
    return [RemoteShard(a, e, lambda e=e: again.remote(root, e, verify)) for a, e in zip(actors, entries)]
