"""A streamed evaluation's per-batch files under ``OUT/batches`` (``eval.streamed``): statistics,
neighbour lists and the run's identity, each written atomically so a rerun reuses whole batches only."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np

from eval import query_batches
from memory import storage

BATCHES_DIR = "batches"
RUN_FILE = "run.json"
STATE_FORMAT = 1


class BatchStore:
    """The per-batch files of a run under ``OUT/batches``: statistics, neighbour lists, the run's identity."""

    def __init__(self, out_dir: str):
        self.dir = os.path.join(out_dir, BATCHES_DIR)

    def _path(self, key: str, what: str) -> str:
        return os.path.join(self.dir, f"{key}.{what}.npz")

    def claim(self, identity: dict) -> None:
        """Write the run's identity, or check it against the one there: batches of another run are never mixed in.

        Raises:
            ValueError: the folder holds batches of an evaluation with other inputs or settings (named).
        """
        path = os.path.join(self.dir, RUN_FILE)
        if os.path.exists(path):
            with open(path) as f:
                before = json.load(f)
            differ = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
            if differ:
                raise ValueError(f"{self.dir} holds the batches of another evaluation (it differs in "
                                 f"{', '.join(differ)}); use another --out, or delete {self.dir} to start over")
            return
        os.makedirs(self.dir, exist_ok=True)
        storage.write_bytes_atomic(path, json.dumps(identity, indent=1, sort_keys=True).encode())

    @contextlib.contextmanager
    def kept_only_if_useful(self):
        """On failure, remove what this run created here unless it holds a finished batch: a run refused on
        its input leaves the disk as it found it, a killed or failed one keeps what a rerun can reuse."""
        out_dir = os.path.dirname(self.dir)
        made = out_dir if not os.path.exists(out_dir) else self.dir if not os.path.exists(self.dir) else None
        try:
            yield
        except BaseException:
            finished = os.path.isdir(self.dir) and any(n.endswith(".stats.npz") for n in os.listdir(self.dir))
            if made and not finished:
                shutil.rmtree(made, ignore_errors=True)
            raise

    def done(self, batch: query_batches.Batch) -> bool:
        return os.path.exists(self._path(batch.key, "stats")) and (
            batch.kind != "q" or os.path.exists(self._path(batch.key, "nb")))

    def write(self, key: str, stats: dict, neighbours: dict | None = None) -> None:
        """The batch's neighbour lists, then its statistics: a batch whose statistics are there is whole."""
        if neighbours is not None:
            _write_npz(self._path(key, "nb"), neighbours)
        _write_npz(self._path(key, "stats"), stats)

    def stats(self, key: str) -> dict:
        with np.load(self._path(key, "stats")) as z:
            return {k: z[k] for k in z.files}

    def neighbours(self, key: str):
        """``(labels int64, sims float32, weights float32 or None, truth int64)``: the batch's labelled
        queries' neighbour lists, as its worker searched them, and their labels."""
        with np.load(self._path(key, "nb")) as z:
            weights = z["weights"] if "weights" in z.files else None
            return z["labels"].astype(np.int64), z["sims"], weights, z["truth"].astype(np.int64)


def _write_npz(path: str, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes_atomic(path, buf.getvalue())
