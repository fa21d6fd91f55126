"""Publishing a change as the next version: derive it from the latest, publish, re-derive on a lost race.

Every change (build, add, remove, compact) is a function from the version it derives from to the
manifest of the next one. :func:`publish_derived` reads the latest version, calls it, and publishes
the result with :func:`memory.manifest.publish` (create-if-absent); when another writer published
that version first it waits a random, growing while and derives again from the new latest, where
the change decides whether its work still applies. So no acknowledged change is ever lost, and
none is applied to a stale parent.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Callable

from memory import manifest as mf
from memory.manifest import ConcurrentUpdate, Manifest, MemoryFormatError

log = logging.getLogger("vismem.publish")
ATTEMPTS = 40
BASE_DELAY_S = 0.02
MAX_DELAY_S = 1.0


def backoff(attempt: int) -> float:
    """Seconds to wait before try ``attempt + 1``: full jitter, growing to :data:`MAX_DELAY_S`."""
    return random.uniform(0, min(MAX_DELAY_S, BASE_DELAY_S * 2 ** attempt))


def publish_derived(root: str, derive: Callable[[Manifest], Manifest | None], *, what: str,
                    attempts: int = ATTEMPTS) -> tuple[Manifest, Manifest | None, int]:
    """Publish ``derive(latest)`` as version ``latest.version + 1``; retry from the new latest when beaten.

    ``derive`` returns the new manifest, or None when its change is already in ``latest`` (nothing
    is published then). It may raise to give up (its error propagates). A ``derive`` that fails
    because a file of its parent vanished (``gc`` of a version that stopped being the latest) is
    retried as a lost race.

    Returns ``(parent, published manifest or None, tries)``.

    Raises:
        ConcurrentUpdate: still beaten after ``attempts`` tries.
    """
    last = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff(attempt))
        parent = mf.read_manifest(root)
        try:
            manifest = derive(parent)
        except (FileNotFoundError, MemoryFormatError):
            if mf.latest_version(root) == parent.version:
                raise
            continue  # the parent was superseded (and collected) under us
        if manifest is None:
            return parent, None, attempt + 1
        if manifest.version != parent.version + 1:
            raise ValueError(f"{what}: derived version {manifest.version} from version {parent.version}")
        try:
            mf.publish(root, manifest)
            return parent, manifest, attempt + 1
        except ConcurrentUpdate as exc:
            last = exc
            log.info("%s: lost the race for version %d (%s); deriving again", what, manifest.version, exc)
    raise ConcurrentUpdate(root, last.version if last else -1,
                           f"other writers on each of {attempts} tries ({what} gave up)")
