"""The served version of a memory: atomic swaps with per-version reference counts, the poller, the lease keeper."""
from __future__ import annotations

import contextlib
import logging
import threading

from memory import leases
from memory import manifest as mf
from memory.memory import Memory

log = logging.getLogger("vismem.serve")


class _Slot:
    def __init__(self, mem: Memory):
        self.mem = mem
        self.users = 0
        self.retired = False


class ServedMemory:
    """The currently served version of a memory, swapped atomically when a newer one is published.

    ``with served.use() as mem:`` pins a version for one request; a retired version is closed by
    the last request that used it. ``_lock`` (taken by every request) guards only the slot swap and
    the counts: no storage I/O ever happens under it. ``_reload_lock`` runs one refresh at a time.
    """

    def __init__(self, path: str, *, version: int | None = None, lease_s: float = 600.0):
        self.path = path
        self.pinned = version is not None
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._slot = _Slot(self._open(version))
        self.last_check_error: str | None = None
        self.last_lease_error: str | None = None
        self.swaps = 0

    def _open(self, version):
        return Memory.open(self.path, version, lease_s=self.lease_s)

    @property
    def version(self) -> int:
        return self._slot.mem.version

    @contextlib.contextmanager
    def use(self):
        with self._lock:
            slot = self._slot
            slot.users += 1
        try:
            yield slot.mem
        finally:
            with self._lock:
                slot.users -= 1
                done = slot.retired and slot.users == 0
            if done:
                slot.mem.close()

    def refresh(self) -> bool:
        """Open and swap in the latest version if it is newer; True when a swap happened.

        A pinned server never swaps: it serves its version until it stops (its admin endpoints refuse
        changes, so nothing it acknowledged is left unserved).
        """
        if self.pinned:
            return False
        with self._reload_lock:
            latest = mf.latest_version(self.path)
            if latest is None or latest <= self.version:
                return False
            new = self._open(latest)  # with its own fresh lease
            with self._lock:
                old, self._slot = self._slot, _Slot(new)
                old.retired = True
                done = old.users == 0
            self.swaps += 1
            log.info("serving %s version %d (was %d)", self.path, latest, old.mem.version)
            if done:
                old.mem.close()
            return True

    def renew_lease(self) -> bool:
        """Replace the served version's lease with a fresh one, so ``vismem gc`` keeps its files.

        The new lease is written before the old one is removed (the version is never unleased), both
        outside ``_lock``; only the swap of the lease path happens under it. True when renewed; False
        when the server holds no lease or the version was swapped meanwhile (its successor has its own).
        """
        with self._lock:
            slot = self._slot
            old = slot.mem.lease
        if old is None:
            return False
        fresh = leases.acquire(self.path, slot.mem.version, self.lease_s)
        with self._lock:
            current = slot is self._slot and not slot.retired and slot.mem.lease == old
            if current:
                slot.mem.lease = fresh
        leases.release(old if current else fresh)
        return current

    def close(self):
        with self._lock:
            slot = self._slot
            slot.retired = True
            done = slot.users == 0
        if done:
            slot.mem.close()


class LeaseKeeper(threading.Thread):
    """Renews the served version's lease every ``lease_s / 3`` seconds, for every server (pinned too).

    A failed renewal is retried at the next tick (two may fail before the lease lapses) and reported
    in ``/v1/health`` as ``last_lease_error``.
    """

    def __init__(self, served: ServedMemory):
        super().__init__(name="vismem-lease-keeper", daemon=True)
        self.served, self.interval, self.stop = served, served.lease_s / 3, threading.Event()

    def run(self):
        while not self.stop.wait(self.interval):
            try:
                self.served.renew_lease()
                self.served.last_lease_error = None
            except Exception as exc:  # noqa: BLE001 - keep serving; the next tick tries again
                self.served.last_lease_error = f"{type(exc).__name__}: {exc}"
                log.warning("renewing the lease of %s version %d failed: %s", self.served.path,
                            self.served.version, exc)


class Poller(threading.Thread):
    """Checks for a newer version every ``interval`` seconds; a failed check keeps the current one."""

    def __init__(self, served: ServedMemory, interval: float):
        super().__init__(name="vismem-version-poller", daemon=True)
        self.served, self.interval, self.stop = served, interval, threading.Event()

    def run(self):
        while not self.stop.wait(self.interval):
            try:
                self.served.refresh()
                self.served.last_check_error = None
            except Exception as exc:  # noqa: BLE001 - keep serving the current version; report why
                self.served.last_check_error = f"{type(exc).__name__}: {exc}"
                log.warning("version check of %s failed, still serving version %d: %s",
                            self.served.path, self.served.version, exc)
