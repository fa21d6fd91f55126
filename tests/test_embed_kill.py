"""Crash and resume, for real: ``vismem embed`` is killed with SIGKILL midway (driver, Ray and workers), then
re-run; the result must be exactly the rows of an uninterrupted run, with no loss and no duplicates."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from conftest import kill_tree
from pipelines.outputs import OutputLayout, read_run

ARGS = ["fashion-mnist", "--split", "test", "--limit", "360", "--shard-size", "30", "--image-size", "32",
        "--batch-size", "10", "--num-workers", "1", "--no-progress"]


def _vismem(out, **popen):
    cmd = [sys.executable, "-m", "cli", "embed", ARGS[0], str(out), *ARGS[1:]]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **popen)


def _done(out):
    d = out / "embeddings"
    return sorted(n for n in os.listdir(d) if n.endswith(".parquet")) if d.exists() else []


def test_sigkill_midway_then_rerun_gives_exactly_the_uninterrupted_rows(tmp_path):
    out, ref = tmp_path / "killed", tmp_path / "reference"
    proc = _vismem(out)
    deadline = time.time() + 120
    while len(_done(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    kill_tree(proc)
    survivors = _done(out)
    assert 2 <= len(survivors) < 12, survivors
    for name in survivors:  # whatever is under a final name is a whole, readable shard
        assert pq.read_table(out / "embeddings" / name).num_rows == 30
    assert not (out / "summary.json").exists()

    rerun = _vismem(out)
    stdout, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout)
    assert summary["shards"] == {"total": 12, "written_this_run": 12 - len(survivors),
                                 "complete_before": len(survivors)}
    assert summary["counts"]["embedded"] == summary["counts"]["read"] == 360
    assert not [n for n in os.listdir(out / "embeddings") if ".tmp-" in n]

    reference = _vismem(ref)
    stdout, stderr = reference.communicate(timeout=240)
    assert reference.returncode == 0, stderr.decode()[-3000:]
    a, b = read_run(str(out)), read_run(str(ref))
    assert len(a["ids"]) == len(set(a["ids"])) == 360
    assert a["ids"].tolist() == b["ids"].tolist()
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["embeddings"], b["embeddings"], atol=1e-6)
    assert len(OutputLayout(str(out)).completed()) == 12
