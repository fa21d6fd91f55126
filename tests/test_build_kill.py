"""A Beam add killed midway (a real SIGKILL of the process group) publishes nothing; gc cleans up after it."""
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import clustered, oracle_topk
from memory import Memory, schema, write_memory
from memory import manifest as mf
from memory.mutations import collect_garbage
from pipelines.build import add_to_memory

PIPE = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
VISMEM = os.path.join(os.path.dirname(sys.executable), "vismem")
CLASSES = ["a", "b", "c", "d"]


def test_killed_add_leaves_previous_version_readable_and_intact(tmp_path):
    x, labels = clustered(5000, 16, 4, seed=41)
    ids = np.array([f"m-{i:05d}" for i in range(5000)], dtype=object)
    root = str(tmp_path / "m")
    write_memory(root, x[:2000], labels[:2000], ids[:2000], num_shards=16, backend="exact", class_names=CLASSES)
    new = str(tmp_path / "new.parquet")
    schema.write_embeddings(new, schema.embedding_table(ids[2000:], x[2000:], labels[2000:]))
    q, _ = clustered(25, 16, 4, seed=42)
    with Memory.open(root) as mem:
        before = mem.search(q, 10)

    # One worker writes the 16 new shards one after another; kill the whole job once the first is there.
    proc = subprocess.Popen([VISMEM, "add", root, new, "--runner", "DirectRunner", "--direct_running_mode",
                             "multi_processing", "--direct_num_workers", "1"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial, published_before_kill = [], None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            partial = glob.glob(os.path.join(root, "shards", "v00000002.*", "shard-*"))
            if partial:
                published_before_kill = mf.list_versions(root)
                break
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert partial, "the add never started writing shards"
    assert published_before_kill == [1], "the add finished before it could be killed"

    assert mf.list_versions(root) == [1]
    with Memory.open(root) as mem:
        assert mem.version == 1 and len(mem) == 2000
        after = mem.search(q, 10)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.sims, before.sims)

    # The killed attempt's shards may belong to a build still running: gc leaves them until a
    # version at least as new is published.
    report = collect_garbage(root, keep=1)
    assert report["deleted_paths"] == 0 and report["pending_paths"]
    orphan_dir = os.path.dirname(partial[0])
    assert os.path.isdir(orphan_dir)

    summary = add_to_memory(root, new, pipeline_args=PIPE)
    assert summary["version"] == 2 and summary["items_added"] == 3000 and summary["dead_letter"]["count"] == 0
    with Memory.open(root) as mem:
        assert len(mem) == 5000
        assert mem.search(x[4321], 1).ids[0, 0] == "m-04321"

    report = collect_garbage(root, keep=1)
    assert report["deleted_versions"] == [1] and report["kept_versions"] == [2]
    assert not os.path.exists(orphan_dir)  # the killed attempt's folder is gone
    with Memory.open(root) as mem:  # v2 still uses v1's shards: gc kept them
        assert len(mem) == 5000
        np.testing.assert_array_equal(mem.search(q, 10).ids, oracle_topk(q, x, ids, 10)[0])
    with pytest.raises(FileNotFoundError, match=r"version 1 of .* was deleted by `vismem gc` \(versions that can be opened: \[2\]\)"):
        Memory.open(root, version=1)
