"""Progress of a job's stages: the small interface the command line draws with, and markers workers leave.

A pipeline reports to a ``progress`` object it is handed (``cli.terminal`` draws bars and lines;
:data:`SILENT` draws nothing), so no pipeline knows the terminal:

    with progress.stage("embed", total=60_000, unit="img") as bar:
        bar.update(64)
    progress.note("inputs: 3 files, 600 rows")          # a fact of the run, one line
    progress.warn("12 rows rejected, see OUT/deadletter")  # matters to the user, one line, even with -q

Beam runs its DoFns in other processes (or machines), and the multi-process DirectRunner blocks
the driver until the job ends, so its workers cannot call a bar. Each drops an empty *marker*
file per unit of work done instead, its count in the name (``read-1f0c...-1200``), in a folder
beside the job's shards; :class:`MarkerWatch` lists that folder from a thread on the driver and
moves the bars. Listing is all it costs: no marker is ever read.
"""
from __future__ import annotations

import hashlib
import re
import threading
from typing import Protocol

from memory import storage

POLL_S = 1.0  # how often the driver lists the markers (a local folder; a gs:// listing is one request)
_MARKER = re.compile(r"^([a-z]+)-([0-9a-f]+)-(\d+)$")


class Bar(Protocol):
    n: int  # items so far

    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def stage(self, name: str, total: int | None = None, unit: str = "items", rate: bool = True) -> Bar:
        """A bar (or a line when it ends) for one stage; ``rate``: whether items per second mean anything."""

    def note(self, text: str) -> None: ...

    def warn(self, text: str) -> None: ...


class _SilentBar:
    n = 0

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Silent:
    """A progress object that shows nothing (library calls, tests)."""

    def stage(self, name: str, total: int | None = None, unit: str = "items", rate: bool = True) -> _SilentBar:
        return _SilentBar()

    def note(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        pass


SILENT = Silent()


def marker_dir(root: str, version: int, token: str) -> str:
    """The markers of one run (``shards/vNNNNNNNN.TOKEN/progress``: gc treats leftovers as it treats staging)."""
    from memory import manifest as mf

    return storage.join(root, mf.shard_dir(version, "progress", token=token))


def mark(folder: str, stage: str, key: str, count: int) -> None:
    """Record that one unit of ``stage`` (named by ``key``: a file, a shard) is done, with ``count`` items.

    A retried unit writes the same name again, so it is counted once.
    """
    digest = hashlib.blake2b(str(key).encode(), digest_size=8).hexdigest()
    storage.write_bytes_atomic(storage.join(folder, f"{stage}-{digest}-{int(count)}"), b"")


def read_marks(folder: str) -> dict[str, dict[str, int]]:
    """``{stage: {unit: count}}`` of the markers in ``folder`` (none yet: empty)."""
    out: dict[str, dict[str, int]] = {}
    try:
        names = storage.list_names(folder)
    except (FileNotFoundError, OSError):
        return out
    for name in names:
        m = _MARKER.match(name)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = int(m.group(3))
    return out


class MarkerWatch:
    """Draws a job's stages, one after the other, from the markers its workers leave.

    Args:
        progress: what draws (:class:`Progress`).
        folder: the markers' folder (:func:`marker_dir`).
        stages: ``(marker stage, label, units expected or None, item total or None, unit)`` in the
            order they run; a stage is over when ``units expected`` markers are there, or when a later
            stage's first marker appears, or when the job ends.

    Use as a context manager around the blocking run; call :meth:`finish` with the job's final counts
    (the markers may be gone by then: a job removes its own folder).
    """

    def __init__(self, progress: Progress, folder: str, stages: list[tuple], interval: float = POLL_S):
        self.progress, self.folder, self.stages, self.interval = progress, folder, list(stages), interval
        self.current = 0
        self.bar = None
        self.shown = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="vismem-progress", daemon=True)

    def __enter__(self):
        self._open(0)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        if self.bar is not None:
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the job's own error matters, not the drawing's
                pass
        with self._lock:
            if self.bar is not None:  # the job failed: leave the bar where it stopped
                self.bar.close()
                self.bar = None

    def _open(self, i: int) -> None:
        _, label, _, total, unit = self.stages[i]
        self.current, self.shown = i, 0
        self.bar = self.progress.stage(label, total=total, unit=unit)

    def _advance_to(self, i: int) -> None:
        self.bar.close()
        self._open(i)

    def _move(self, done: int | None) -> None:
        if done is not None and done > self.shown:
            self.bar.update(done - self.shown)
            self.shown = done

    def poll(self) -> None:
        marks = read_marks(self.folder)
        with self._lock:
            if self.bar is None:
                return
            while True:
                key, _, expected, _, _ = self.stages[self.current]
                units = marks.get(key, {})
                self._move(sum(units.values()))
                following = self.stages[self.current + 1:]
                done = expected is not None and len(units) >= expected
                if not following or not (done or any(marks.get(s[0]) for s in following)):
                    break
                self._advance_to(self.current + 1)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - drawing must never fail the job
                pass

    def finish(self, counts: dict | None = None) -> None:
        """The job ended: every remaining stage drawn to its end, from the last markers or from ``counts``
        (``{marker stage: items}``, e.g. the job's counters; None where unknown)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()
        with self._lock:
            for i in range(self.current, len(self.stages)):
                if i != self.current:
                    self._advance_to(i)
                self._move((counts or {}).get(self.stages[i][0]))
            self.bar.close()
            self.bar = None
