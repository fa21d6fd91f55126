"""Racing writers in real processes: every acknowledged change lands, in version order, on disk and on GCS.

Each version is published with a create-if-absent (``memory.manifest.publish``): locally a hard link,
on Cloud Storage an upload with ``ifGenerationMatch=0``, which Cloud Storage evaluates atomically
(412 Precondition Failed when a live object has the name; see its "Request preconditions" page).
The stock gcp-storage-emulator ignores preconditions (shown below), so the races on ``gs://`` run
against the same emulator with its upload handler taught that one rule (:data:`STRICT_EMULATOR`).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import clustered, wait_for_port
from memory import Memory, publishing, removals, schema, storage, write_memory
from memory import manifest as mf
from memory.mutations import collect_garbage, derive_manifest, remove_items
from memory.shard import write_shard
from pipelines.beam_runner import BuildFailed
from pipelines.build import add_to_memory
from pipelines.compact import compact_memory
from ray_head import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["a", "b", "c"]
DIM = 16
CLI = "from cli.main import run; run()"  # as the console script: exits past Arrow's teardown crash
PIPE = ["--runner=DirectRunner"]  # in this process: a hook can publish right before the job does

# The emulator, single-threaded, plus Cloud Storage's rule for ifGenerationMatch=0 on uploads.
STRICT_EMULATOR = r"""
import sys
from http import HTTPStatus
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

plain = objects.insert

def insert(request, response, storage, *args, **kwargs):
    if request.query.get("ifGenerationMatch") == ["0"]:
        data = request.data if isinstance(request.data, dict) else {}
        name = (request.query.get("name") or [None])[0] or (data.get("meta") or data).get("name")
        try:
            storage.get_file_obj(request.params["bucket_name"], name)
        except NotFound:
            pass
        else:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions did not hold."}})
            return
    return plain(request, response, storage, *args, **kwargs)

objects.insert = insert
for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
        if handler is plain:
            handlers[method] = insert
server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
"""

# One writer process: removals (one list of ids each, a pause between) or gc rounds, until the stop file.
WORKER = r"""
import json, os, sys, time
from cli.exits import exit_with  # first: it leaves past Arrow's teardown crash (apache/arrow#34314)
spec = json.loads(sys.argv[1])
root, records = spec["memory"], []
if spec["kind"] == "remove":
    from memory.mutations import remove_items
    for ids in spec["batches"]:
        if os.path.exists(spec["stop"]):
            break
        r = remove_items(root, ids=ids)
        records.append({"kind": "remove", "ids": ids, "version": r["version"] if r["changed"] else None})
        time.sleep(spec["pause"])
else:
    from memory.mutations import collect_garbage
    while not os.path.exists(spec["stop"]):
        records.append(collect_garbage(root, keep=1)["deleted_paths"])
        time.sleep(spec["pause"])
print(json.dumps(records))
exit_with(0)
"""


@pytest.fixture(scope="module")
def strict_emulator():
    port, bucket = free_port(), "vismem-race"
    proc = subprocess.Popen([sys.executable, "-c", STRICT_EMULATOR, str(port), bucket],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc, "the strict emulator")
    yield f"http://127.0.0.1:{port}", f"gs://{bucket}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def strict_gcs(strict_emulator, monkeypatch):
    """A fresh ``gs://`` memory path on the strict emulator, for this process and the writers it starts."""
    host, bucket = strict_emulator
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    return f"{bucket}/{os.urandom(6).hex()}"


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _start(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, what, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}: {err[-2000:]}"
    return json.loads(out)


def _memory(root, n=400, seed=5):
    x, labels = clustered(n, DIM, 3, seed=seed)
    ids = np.array([f"base-{i:04d}" for i in range(n)], dtype=object)
    write_memory(root, x, labels, ids, num_shards=2, class_names=CLASSES)
    return dict(zip(ids, x))


def _replay(initial: dict, changes: list) -> tuple[dict, set]:
    """The items and forgotten ids after applying the published changes in version order."""
    items, forgotten = dict(initial), set()
    for change in sorted(changes, key=lambda c: c["version"]):
        if change["kind"] == "remove":
            for i in change["ids"]:
                items.pop(i, None)
                forgotten.add(i)
        elif change["kind"] == "add":
            for i, vec in change["items"]:
                if i not in items and i not in forgotten:
                    items[i] = vec
    return items, forgotten


def _check_final(root, changes, initial, vectors_of):
    """The latest version is the replay of every acknowledged change: nothing lost, nothing returned."""
    versions = sorted(c["version"] for c in changes)
    assert versions == list(range(2, mf.latest_version(root) + 1)), "a version no writer acknowledged, or one lost"
    want, forgotten = _replay(initial, changes)
    with Memory.open(root) as mem:
        assert len(mem) == len(want)
        ids = list(want)
        nb = mem.search(np.stack([want[i] for i in ids]), 1)
        assert list(nb.ids[:, 0]) == ids  # every item the replay holds, with its own vector
        assert (nb.sims[:, 0] > 0.999).all()
        gone = [(i, v) for i in forgotten for v in vectors_of.get(i, ())]
        if gone:
            found = mem.search(np.stack([v for _, v in gone]), 3).ids
            assert not {i for i, _ in gone} & set(found.ravel()), "a removed id is searchable"
    return want


@pytest.fixture
def before_publish(monkeypatch):
    """``install(fn)``: ``fn(root)`` runs once, right before the next change publishes (it wins the race)."""
    real = publishing.publish_derived

    def install(fn):
        pending = [fn]

        def hooked(root, derive, **kwargs):
            if pending:
                pending.pop()(root)
            return real(root, derive, **kwargs)

        monkeypatch.setattr(publishing, "publish_derived", hooked)
    return install


def _publish_shard(root, ids, x, *, replacing=None):
    """Another writer's version: a shard of ``ids`` added, or (``replacing`` a shard entry) rewritten."""
    latest = mf.read_manifest(root)
    name = replacing.name if replacing else "shard-00000-of-00002-other"
    entry = write_shard(root, mf.shard_dir(latest.version + 1, name, token="other"), x, np.array(ids, dtype=object),
                        np.zeros(len(ids), np.int64), name=name, partition=0, backend_name="exact")
    shards = [e for e in latest.shards if not replacing or e.path != replacing.path] + [entry]
    mf.publish(root, derive_manifest(latest, version=latest.version + 1, change="add", detail={}, shards=shards))


def test_an_add_rebases_onto_a_removal_and_an_add_published_while_it_ran(tmp_path, before_publish):
    root = str(tmp_path / "m")
    initial = _memory(root, n=200)
    x, labels = clustered(12, DIM, 3, seed=31)
    ids = [f"new-{i}" for i in range(10)] + ["hot", "dup"]
    path = str(tmp_path / "add.parquet")
    schema.write_embeddings(path, schema.embedding_table(np.array(ids, dtype=object), x, labels))
    theirs = clustered(1, DIM, 3, seed=32)[0]

    def meanwhile(r):
        remove_items(r, ids=["hot", "base-0003"])  # version 2: 'hot' is forgotten before the add lands
        _publish_shard(r, ["dup"], theirs)  # version 3: another add got 'dup' in first

    before_publish(meanwhile)
    summary = add_to_memory(root, path, pipeline_args=PIPE)
    assert summary["version"] == 4 and summary["rebased"] == {"from": 1, "onto": 3, "tombstoned": 2}
    assert summary["items_added"] == 10 and summary["items_total"] == 200 - 1 + 1 + 10
    changes = [{"kind": "remove", "ids": ["hot", "base-0003"], "version": 2},
               {"kind": "add", "items": [("dup", theirs[0])], "version": 3},
               {"kind": "add", "items": list(zip(ids, x)), "version": 4}]
    vectors = {"hot": [x[10]], "base-0003": [initial["base-0003"]]}
    _check_final(root, changes, initial, vectors)


def test_a_compaction_keeps_removals_published_while_it_ran(tmp_path, before_publish):
    root = str(tmp_path / "m")
    initial = _memory(root, n=200)
    remove_items(root, ids=["base-0001", "base-0002"])  # version 2: work for compaction
    before_publish(lambda r: remove_items(r, ids=["base-0005", "base-0006"]))  # version 3, mid-compaction
    summary = compact_memory(root, pipeline_args=PIPE)
    assert summary["version"] == 4 and summary["items"] == 196
    m = mf.read_manifest(root)
    assert m.change_detail["rebased"] == {"from": 2, "onto": 3, "tombstoned": 2}
    token = m.change_detail["token"]
    assert m.removed_count == 2 and all(f".{token}/" in e.path for e in m.shards)  # on the new shards
    changes = [{"kind": "remove", "ids": ["base-0001", "base-0002"], "version": 2},
               {"kind": "remove", "ids": ["base-0005", "base-0006"], "version": 3},
               {"kind": "compact", "version": 4}]
    _check_final(root, changes, initial, {i: [v] for i, v in initial.items()})


def test_a_compaction_beaten_by_another_rewrite_gives_up_clearly(tmp_path, before_publish):
    root = str(tmp_path / "m")
    _memory(root, n=200)
    remove_items(root, ids=["base-0001", "base-0002"])

    def other_compaction(r):  # rewrites a shard with removed items, as a compaction would
        m = mf.read_manifest(r)
        dirty = next(e for e in m.shards if e.path in removals.tombstones_by_shard(r, m))
        _publish_shard(r, ["other-0"], np.eye(DIM, dtype=np.float32)[:1], replacing=dirty)

    before_publish(other_compaction)
    with pytest.raises(BuildFailed, match="rewrote shard shards/v00000001/shard-0000.-of-00002 .*run compact again"):
        compact_memory(root, pipeline_args=PIPE)
    assert mf.latest_version(root) == 3  # the other rewrite; this compaction published nothing


def test_the_stock_emulator_ignores_preconditions(gcs_path):
    # Cloud Storage refuses a second upload with ifGenerationMatch=0 (412); this emulator accepts it,
    # so on it two writers could both "create" one version: the race tests use STRICT_EMULATOR.
    fs, p = storage.filesystem(f"{gcs_path}/v.json")
    fs.pipe_file(p, b"first", mode="create")
    fs.pipe_file(p, b"second", mode="create")
    assert storage.read_bytes(f"{gcs_path}/v.json") == b"second"


def test_publish_on_gcs_creates_a_version_once(strict_gcs):
    _memory(strict_gcs, n=30)
    m = mf.read_manifest(strict_gcs)
    before = storage.read_bytes(mf.manifest_path(strict_gcs, 1))
    with pytest.raises(mf.ConcurrentUpdate, match=f"version 1 of {strict_gcs} was published meanwhile"):
        mf.publish(strict_gcs, mf.Manifest.new(version=1, dim=DIM, class_names=CLASSES, backend="exact",
                                               shards=m.shards))
    assert storage.read_bytes(mf.manifest_path(strict_gcs, 1)) == before
    assert mf.publish(strict_gcs, m) == mf.manifest_path(strict_gcs, 1)  # its own bytes: a retried create


def test_two_concurrent_cli_removes_both_land(tmp_path):
    root = str(tmp_path / "m")
    initial = _memory(root)
    changes = []
    for r in range(2):  # two rounds of two `vismem remove` started together (the old code lost 4 of 9)
        procs = []
        for w in range(2):
            ids = tmp_path / f"ids-{r}-{w}.txt"
            ids.write_text(f"base-{10 * r + w:04d}\n")
            procs.append((_start(CLI, "remove", root, "--ids", ids), [f"base-{10 * r + w:04d}"]))
        for proc, ids in procs:
            out = _finish(proc, "vismem remove")
            assert out["removed"] == 1
            changes.append({"kind": "remove", "ids": ids, "version": out["version"]})
    _check_final(root, changes, initial, {i: [v] for i, v in initial.items()})


def _race(root, tmp_path, *, adders, removers, gc=False):
    """Adds (``vismem add``) against removers publishing every 0.2 s (and gc); the changes published."""
    initial = _memory(root)
    vectors = {i: [v] for i, v in initial.items()}
    stop = tmp_path / "stop"
    procs = []
    for r in range(removers):
        singles = [[f"base-{i:04d}"] for i in range(r, 400, removers)][:150]
        batches = singles[:3] + [[f"hot-{a}-{r}"] for a in range(adders)] + singles[3:]  # hot: during the adds
        spec = {"kind": "remove", "memory": root, "batches": batches, "stop": str(stop), "pause": 0.2}
        procs.append(("remover", _start(WORKER, json.dumps(spec))))
    if gc:
        spec = {"kind": "gc", "memory": root, "stop": str(stop), "pause": 0.3}
        procs.append(("gc", _start(WORKER, json.dumps(spec))))
    while mf.latest_version(root) < 2:  # removals are flowing before the adds read their parent
        time.sleep(0.05)
    adds = []
    for a in range(adders):
        x, labels = clustered(30, DIM, 3, seed=100 + a)
        ids = [f"add-{a}-{i:02d}" for i in range(27)] + ["dup"] + [f"hot-{a}-{r}" for r in range(removers)]
        x, labels = x[:len(ids)], labels[:len(ids)]
        path = str(tmp_path / f"add-{a}.parquet")
        schema.write_embeddings(path, schema.embedding_table(np.array(ids, dtype=object), x, labels))
        for i, v in zip(ids, x):
            vectors.setdefault(i, []).append(v)
        adds.append((_start(CLI, "add", root, path, "--runner=DirectRunner"), list(zip(ids, x))))
    changes = []
    for proc, items in adds:
        out = _finish(proc, "vismem add")
        assert out.get("rebased"), "the add published without racing anyone: the test did not test"
        changes.append({"kind": "add", "items": items, "version": out["version"]})
    stop.write_text("")
    for kind, proc in procs:
        records = _finish(proc, kind)
        changes += [c for c in records if kind == "remover" and c["version"] is not None]
    return changes, initial, vectors


def test_adds_removes_and_gc_race_on_local_disk(tmp_path):
    root = str(tmp_path / "m")
    changes, initial, vectors = _race(root, tmp_path, adders=2, removers=2, gc=True)
    want = _check_final(root, changes, initial, vectors)
    assert "dup" in want and not {"hot-0-0", "hot-1-1"} & set(want)
    assert sum(c["kind"] == "remove" for c in changes) >= 4


def test_adds_and_removes_race_on_gcs(strict_gcs, tmp_path):
    changes, initial, vectors = _race(strict_gcs, tmp_path, adders=1, removers=2)
    want = _check_final(strict_gcs, changes, initial, vectors)
    assert "add-0-00" in want and "hot-0-0" not in want


def test_a_writer_derived_from_a_collected_parent_cannot_publish_again(tmp_path):
    # gc once deleted old manifests, freeing their names: a writer still holding version 1 then
    # created "version 2" again below the latest, and its acknowledged removal was lost (CI caught
    # two writers acknowledging version 2). Retired versions keep their names.
    root = str(tmp_path / "m")
    _memory(root, n=60)
    stale = mf.read_manifest(root)
    remove_items(root, ids=["base-0001"])
    remove_items(root, ids=["base-0002"])
    report = collect_garbage(root, keep=1)
    assert report["deleted_versions"] == [1, 2] and mf.list_versions(root) == [3] and mf.latest_version(root) == 3
    late = derive_manifest(stale, version=2, change="remove", detail={}, shards=stale.shards)
    with pytest.raises(mf.ConcurrentUpdate, match="version 2 of .* published meanwhile by another writer "
                                                   r"\(it has since been deleted by gc\)"):
        mf.publish(root, late)
    with pytest.raises(mf.VersionRetired, match="version 2 of .* was deleted by `vismem gc`"):
        mf.read_manifest(root, 2)
    assert mf.read_manifest(root).version == 3 and mf.latest_version(root) == 3
