"""The encoder actors of ``vismem embed`` as a pool that outlives a lost node: a lost actor's shard goes to another.

Ray's own actor restarts are not enough when a node is lost: a restarted actor waits for a CPU the
shrunken cluster may not have, and its queued calls (and the run) wait forever. So the pool's
actors never restart; when a call fails because its actor died, the actor leaves the pool, the
shard is queued again first, and a replacement is started, which takes work only once it is up (a
replacement the cluster cannot place holds nothing up, and takes over when a node joins). A shard
is written under its final name in one atomic step, so a shard done twice is still there once.
"""
from __future__ import annotations

import collections
import itertools
from typing import Callable


class EmbedPool:
    """One call at a time per actor, over a queue of items; survives losing actors.

    Args:
        make_actor: starts one actor (with a ``ready`` method); called ``count`` times now and once
            per lost actor.
        max_attempts: an item whose actor dies this many times fails the run (something in the item,
            not a lost node, is killing its actors); the pool gives up after losing
            ``max_attempts * count`` actors in all.
    """

    def __init__(self, make_actor: Callable[[], object], count: int, max_attempts: int = 3):
        import ray

        self._ray = ray
        self.make_actor, self.max_attempts, self.max_lost = make_actor, max_attempts, max_attempts * count
        self.idle: list = []
        self.starting: dict = {}  # ready() call -> actor not yet up
        self.running: dict = {}  # call -> (actor, item)
        self.attempts: collections.Counter = collections.Counter()
        self.lost = 0
        for _ in range(count):
            self._start()

    def _start(self) -> None:
        actor = self.make_actor()
        self.starting[actor.ready.remote()] = actor

    def wait_ready(self) -> list:
        """Block until every actor started so far is up (or lost, and replaced); their ``ready()`` answers.

        Raises:
            ray.exceptions.RayActorError: an actor's constructor failed (a bad model, say): not a lost node.
        """
        infos = []
        while self.starting and not infos:
            self._ray.wait(list(self.starting), num_returns=len(self.starting))
            infos = self._adopt_ready()
        return infos

    def run(self, items: list, submit: Callable, prepare: Callable[[list], None], tick: Callable[[], None],
            key: Callable = str) -> list:
        """``submit(actor, item)`` (a call ref) for every item; the calls' results, in completion order.

        ``prepare(upcoming)`` is told the next items before they are submitted (to start reading them);
        ``tick()`` runs about twice a second (a progress bar).

        Raises:
            RuntimeError: an item lost its actor ``max_attempts`` times, or no actor is left or starting.
        """
        pending = collections.deque(items)
        results = []
        try:
            while pending or self.running:
                self._adopt_ready()
                prepare(list(itertools.islice(pending, len(self.idle) + len(self.running))))
                while pending and self.idle:
                    actor, item = self.idle.pop(0), pending.popleft()
                    self.running[submit(actor, item)] = (actor, item)
                waiting = list(self.running) or list(self.starting)
                if not waiting:
                    raise RuntimeError(f"every encoder actor was lost ({self.lost} in all); run the same command "
                                       "again: finished shards are kept")
                done, _ = self._ray.wait(waiting, num_returns=1, timeout=0.5)
                tick()
                for ref in (r for r in done if r in self.running):
                    actor, item = self.running.pop(ref)
                    try:
                        results.append(self._ray.get(ref))
                        self.idle.append(actor)
                    except self._ray.exceptions.RayActorError as exc:
                        self._lose(actor, exc, key(item))
                        pending.appendleft(item)
        finally:
            self.close()
        return results

    def _lose(self, actor, exc, what: str | None) -> None:
        """Drop a dead actor and start a replacement, unless item ``what`` (or the pool) has lost too many."""
        self.lost += 1
        if what is not None:
            self.attempts[what] += 1
        try:
            self._ray.kill(actor, no_restart=True)  # "unavailable" may mean alive but cut off: make sure
        except Exception:  # noqa: BLE001 - already gone
            pass
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if what is not None and self.attempts[what] >= self.max_attempts:
            raise RuntimeError(f"{what} lost its encoder actor {self.max_attempts} times (last: {first})") from exc
        if self.lost > self.max_lost:
            raise RuntimeError(f"{self.lost} encoder actors lost (last: {first}); giving up") from exc
        self._start()

    def _adopt_ready(self) -> list:
        """Actors that are up join the pool (their ``ready()`` answers returned); lost ones are replaced."""
        if not self.starting:
            return []
        done, _ = self._ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        infos = []
        for ref in done:
            actor = self.starting.pop(ref)
            try:
                infos.append(self._ray.get(ref))
            except self._ray.exceptions.RayActorError as exc:
                if exc.actor_init_failed:
                    raise
                self._lose(actor, exc, None)
                continue
            self.idle.append(actor)
        return infos

    def close(self) -> None:
        """Stop actors that never came up (they would otherwise wait for a CPU forever)."""
        for actor in self.starting.values():
            self._ray.kill(actor)
        self.starting = {}
