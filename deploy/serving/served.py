"""The served version of a memory: atomic swaps with per-version reference counts, lease renewal, the poller."""
from __future__ import annotations

import contextlib
import logging
import threading
import time

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
    the last request that used it.
    """

    def __init__(self, path: str, *, version: int | None = None, lease_s: float = 600.0):
        self.path = path
        self.pinned = version is not None
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._slot = _Slot(self._open(version))
        self._lease_t = time.monotonic()
        self.last_check_error: str | None = None
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
        """Open and swap in the latest version if it is newer; True when a swap happened."""
        if self.pinned:
            return False
        with self._reload_lock:
            latest = mf.latest_version(self.path)
            if latest is None or latest <= self.version:
                self._renew_lease()
                return False
            new = self._open(latest)
            with self._lock:
                old, self._slot = self._slot, _Slot(new)
                old.retired = True
                done = old.users == 0
            self._lease_t = time.monotonic()
            self.swaps += 1
            log.info("serving %s version %d (was %d)", self.path, latest, old.mem.version)
            if done:
                old.mem.close()
            return True

    def _renew_lease(self):
        """Keep ``vismem gc`` away from the served version: replace the lease before it expires."""
        if time.monotonic() - self._lease_t < self.lease_s / 2:
            return
        with self._lock:
            mem = self._slot.mem
            if mem.lease is None:
                return
            old, mem.lease = mem.lease, leases.acquire(self.path, mem.version, self.lease_s)
        self._lease_t = time.monotonic()
        leases.release(old)

    def close(self):
        with self._lock:
            slot = self._slot
            slot.retired = True
            done = slot.users == 0
        if done:
            slot.mem.close()


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
