"""Leave the interpreter without finalising it: Arrow's I/O threads can abort it there (apache/arrow#34314).

A ``vismem`` run that read Parquet sometimes ended with "terminate called without an active exception"
and status 134 after printing its result: the crash happens while the interpreter tears down, after
every exit handler. Registered before Ray, Beam or Arrow are imported, :func:`_leave` runs after their
exit handlers (they run last-registered first), flushes the standard streams and ends the process with
the status already decided.
"""
from __future__ import annotations

import atexit
import os
import sys

_status: list = []


def _leave() -> None:
    if not _status:
        return  # an unexpected exception: let Python report it and exit as it would
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_status[0])


atexit.register(_leave)


def exit_with(status: int) -> None:
    """``sys.exit(status)``, with the interpreter's teardown skipped once exit handlers have run."""
    _status.append(int(status))
    sys.exit(status)
