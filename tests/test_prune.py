"""Pruning as a memory operation (``vismem prune``): the Beam job equals the in-process core, publishes versions.

The oracle is ``eval.pruning.wrong_contributions`` over one in-process search of every live item
(``Memory.search`` at self-k + 1, routed the same way): the job counts shard by shard on Beam workers
and must give the same ``v``, hence the same removed ids (hard) and the same weights (soft).
"""
import json
import os

import numpy as np
import pytest

from conftest import clustered
from eval import pruning as oracle_core
from memory import Memory, removals, schema, voting, write_memory
from memory import manifest as mf
from memory.items import read_items
from memory.manifest import ConcurrentUpdate
from memory.mutations import collect_garbage, remove_items, version_history
from memory.pruning import (Rule, block_counts, check_self_k, count_wrong, prune_in_process, publish_soft,
                            reweighted_shard, sum_counts)
from memory.shard import read_vectors
from pipelines.prune import prune_memory

PIPE = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
CLASSES = [f"c{i}" for i in range(6)]


def _noisy(n, dim=16, seed=7, noise=0.7, flip_every=15):
    """Clustered items, every ``flip_every``-th label shifted: mislabelled items collect wrong contributions."""
    x, labels = clustered(n, dim, len(CLASSES), seed=seed, noise=noise)
    labels = labels.copy()
    labels[::flip_every] = (labels[::flip_every] + 1) % len(CLASSES)
    ids = np.array([f"it-{(i * 7919) % n:06d}" for i in range(n)], dtype=object)
    return x, labels, ids


def _oracle(root, version, self_k, probe_shards=None):
    """``(ids, v)`` of every live item of ``version`` from one in-process search of all of them."""
    manifest = mf.read_manifest(root, version)
    dead = removals.tombstones_by_shard(root, manifest)
    ids, labels, vectors = [], [], []
    for e in manifest.shards:
        t = read_items(root, e, ["id", "label"])
        i = np.asarray(t.column("id").to_pylist(), dtype=object)
        live = ~np.isin(i.astype(str), list(dead.get(e.path, ())))
        ids.append(i[live])
        labels.append(t.column("label").to_numpy()[live])
        vectors.append(read_vectors(root, e, np.flatnonzero(live)))
    ids, labels, vectors = np.concatenate(ids), np.concatenate(labels), np.concatenate(vectors)
    with Memory.open(root, version) as mem:
        nb = mem.search(vectors, self_k + 1, probe_shards=probe_shards)
    return ids, oracle_core.wrong_contributions(ids, labels, nb.ids, nb.labels, ids, k=self_k)


def _weights(root, version):
    out = {}
    for e in mf.read_manifest(root, version).shards:
        t = read_items(root, e, ["id", "weight"])
        out.update(zip(t.column("id").to_pylist(), t.column("weight").to_numpy()))
    return out


def _removed(root, version):
    return {i for ids in removals.tombstones_by_shard(root, mf.read_manifest(root, version)).values() for i in ids}


def _check_soft(root, version, ids, v, dd=1.75, c=1.0):
    """Every live item's weight is gamma(v) as float32, exactly; searches hand those weights to the votes."""
    got = _weights(root, version)
    want = oracle_core.soft_weights(v, c=c, dd=dd).astype(np.float32)
    np.testing.assert_array_equal(np.array([got[i] for i in ids], np.float32), want)
    assert (want < 1).any() and (want == 1).any()
    return dict(zip(ids, want))


def test_block_counts_by_hand_and_partial_sums():
    # Query a's self-match is second, b's is missing (the first k others count), c's list has padding
    # and an unlabelled neighbour. Labels: a=0, b=1, c=0.
    q_ids, q_labels = ["a", "b", "c"], [0, 1, 0]
    nb_ids = np.array([["x", "a", "y", "z"], ["a", "x", "y", "a"], ["c", "u", "", ""]], dtype=object)
    nb_labels = np.array([[1, 0, 0, 1], [0, 1, 2, 0], [0, -1, -1, -1]])
    ids, counts = block_counts(q_ids, q_labels, nb_ids, nb_labels, k=2)
    # a: x(1) y(0) -> x wrong; b: a(0) x(1) -> a wrong; c: u(-1) '' -> nothing.
    assert ids.tolist() == ["a", "x"] and counts.tolist() == [1, 1]
    items = ["a", "b", "c", "u", "x", "y", "z"]
    v = oracle_core.wrong_contributions(q_ids, q_labels, nb_ids, nb_labels, items, k=2)
    assert dict(zip(items, v.tolist())) == {"a": 1, "b": 0, "c": 0, "u": 0, "x": 1, "y": 0, "z": 0}
    halves = [block_counts(q_ids[:1], q_labels[:1], nb_ids[:1], nb_labels[:1], k=3),
              block_counts(q_ids[1:], q_labels[1:], nb_ids[1:], nb_labels[1:], k=3)]
    ids, counts = sum_counts(halves)  # a: x, z wrong; b: a, y wrong (its second 'a' is a fourth other)
    assert dict(zip(ids, counts.tolist())) == {"a": 1, "x": 1, "y": 1, "z": 1}
    ids, counts = sum_counts([*halves, (np.array(["a", "q"], dtype=object), np.array([4, 2]))])
    assert dict(zip(ids, counts.tolist())) == {"a": 5, "q": 2, "x": 1, "y": 1, "z": 1}
    with pytest.raises(ValueError, match="at least k \\+ 1 = 4"):
        block_counts(q_ids, q_labels, nb_ids[:, :3], nb_labels[:, :3], k=3)


def test_exact_shards_hard_and_soft_equal_the_in_process_core(tmp_path, capsys):
    """Four exact shards with removed items: the job's removed ids and weights are the core's."""
    from cli.main import main

    x, labels, ids = _noisy(2400)
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, num_shards=4, class_names=CLASSES)
    removed_first = list(ids[5:35])
    remove_items(root, ids=removed_first, reason="request 1")  # v2: removed items are neither queries nor neighbours
    live_ids, v = _oracle(root, 2, self_k=10)
    assert len(live_ids) == 2370 and (v > 0).sum() > 100
    in_process = count_wrong(root, self_k=10)
    np.testing.assert_array_equal(in_process.of(live_ids), v)

    soft = prune_memory(root, self_k=10, soft=True, pipeline_args=PIPE)  # v3
    assert soft["changed"] and soft["version"] == 3 and soft["items_with_wrong"] == (v > 0).sum()
    gamma = _check_soft(root, 3, live_ids, v)
    assert all(_weights(root, 3)[i] == 1.0 for i in removed_first)  # removed rows keep theirs
    q, _ = clustered(60, 16, len(CLASSES), seed=8)
    with Memory.open(root, 3) as mem:
        res = mem.classify(q, 15, "rank")
    nb = res.neighbours
    np.testing.assert_array_equal(nb.weights, np.vectorize(gamma.get)(nb.ids).astype(np.float32))
    want = voting.predict(nb.labels, nb.sims, method="rank", num_classes=len(CLASSES), k=15,
                          weights=np.vectorize(gamma.get)(nb.ids))
    np.testing.assert_array_equal(res.predictions, want)

    # Hard pruning through the command line; v of version 3 is v of version 2 (weights do not count).
    assert main(["prune", root, "--self-k", "10", "--hard", "2", *PIPE]) == 0
    out = capsys.readouterr()
    hard = json.loads(out.out)
    pruned = set(live_ids[v >= 2])
    assert f"pruned {root} to version 4: {len(pruned):,} items removed (v >= 2); " in out.err  # the summary line
    assert hard["version"] == 4 and hard["removed"] == len(pruned) > 20 and hard["threshold"] == 2
    assert _removed(root, 4) == pruned | set(removed_first)
    forget = removals.forget_list(root, mf.read_manifest(root, 4))
    assert sorted(forget.column("id").to_pylist()) == sorted(removed_first)  # pruning is not unlearning
    with Memory.open(root, 4) as mem:
        assert len(mem) == 2370 - len(pruned)
        found = mem.search(x, 20).ids
    assert not set(found.ravel()) & pruned and (found != "").all()

    assert main(["versions", root]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [h["change"] for h in history] == ["write", "remove", "prune", "prune"]
    d_soft, d_hard = history[2]["detail"], history[3]["detail"]
    assert {k: d_soft[k] for k in ("mode", "self_k", "c", "dd", "probe_shards", "engine")} == {
        "mode": "soft", "self_k": 10, "c": 1.0, "dd": 1.75, "probe_shards": None, "engine": "beam"}
    assert {k: d_hard[k] for k in ("mode", "self_k", "threshold", "reason", "removed")} == {
        "mode": "hard", "self_k": 10, "threshold": 2, "reason": "pruned", "removed": len(pruned)}
    assert history[3]["forgotten"] == len(removed_first)
    assert mf.read_manifest(root, 3).tombstones != mf.read_manifest(root, 2).tombstones  # moved to new shard paths
    assert not list((tmp_path / "m").rglob("staging"))  # the job's staging files are gone


def test_scann_tree_memory_equals_the_in_process_core(tmp_path):
    """ScaNN trees (by size alone: 6,000 items a shard, trees from 5,000): the job runs the same
    searcher, so v is equal, not close."""
    x, labels, ids = _noisy(12_000, seed=9, noise=0.6, flip_every=40)
    root = str(tmp_path / "m")
    manifest = write_memory(root, x, labels, ids, num_shards=2, backend="scann", class_names=CLASSES)
    assert all(not e.params["brute_force"] for e in manifest.shards)
    live_ids, v = _oracle(root, 1, self_k=10)
    assert (v > 0).sum() > 300
    soft = prune_memory(root, self_k=10, soft=True, pipeline_args=PIPE)
    assert soft["version"] == 2 and soft["reweighted_shards"] == 2
    _check_soft(root, 2, live_ids, v)
    hard = prune_memory(root, self_k=10, hard=3, pipeline_args=PIPE)
    assert hard["version"] == 3 and _removed(root, 3) == set(live_ids[v >= 3]) and hard["removed"] > 30
    with Memory.open(root, 3) as mem:
        assert len(mem) == 12_000 - hard["removed"]
        assert not set(mem.search(x[:300], 30).ids.ravel()) & set(live_ids[v >= 3])


def test_routed_counts_on_a_kmeans_memory(tmp_path):
    """--probe-shards 1 on a k-means memory: each self-query searches its nearest shard only, as the oracle's."""
    from pipelines.build import build_memory

    x, labels, ids = _noisy(1800, seed=13)
    emb = str(tmp_path / "emb.parquet")
    schema.write_embeddings(emb, schema.embedding_table(ids, x, labels))
    root = str(tmp_path / "m")
    build_memory(emb, root, num_shards=3, class_names=CLASSES, partition="kmeans", backend="exact",
                 pipeline_args=PIPE)
    live_ids, v = _oracle(root, 1, self_k=8, probe_shards=1)
    _, v_all = _oracle(root, 1, self_k=8)
    assert not np.array_equal(v, v_all)  # routing changes the neighbour lists: the test can tell them apart
    res = prune_memory(root, self_k=8, soft=True, c=0.5, dd=2.0, probe_shards=1, pipeline_args=PIPE)
    assert res["probe_shards"] == 1 and version_history(root)[-1]["detail"]["probe_shards"] == 1
    _check_soft(root, 2, live_ids, v, c=0.5, dd=2.0)


def test_gcs_memory(gcs_path):
    x, labels, ids = _noisy(900, seed=17)
    write_memory(gcs_path, x, labels, ids, num_shards=3, class_names=CLASSES)
    live_ids, v = _oracle(gcs_path, 1, self_k=6)
    prune_memory(gcs_path, self_k=6, soft=True, pipeline_args=PIPE)
    _check_soft(gcs_path, 2, live_ids, v)
    res = prune_memory(gcs_path, self_k=6, hard=2, pipeline_args=PIPE)
    assert res["version"] == 3 and _removed(gcs_path, 3) == set(live_ids[v >= 2])
    with Memory.open(gcs_path) as mem:  # every checksum verified, the copied index files included
        assert len(mem) == 900 - res["removed"]
    assert [h["change"] for h in version_history(gcs_path)] == ["write", "prune", "prune"]


def test_gc_and_compact_keep_what_pruning_published(tmp_path):
    from pipelines.compact import compact_memory

    x, labels, ids = _noisy(1200, seed=19)
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, num_shards=3, class_names=CLASSES)
    counts = count_wrong(root, self_k=10)
    prune_in_process(root, Rule.soft(), self_k=10, counts=counts)  # v2: its shards link v1's index files
    collect_garbage(root, keep=1)  # v1's folders are deleted; the links keep the files
    assert not (tmp_path / "m" / "shards" / "v00000001").exists()
    with Memory.open(root) as mem:  # every checksum verified
        assert len(mem) == 1200
    hard = prune_in_process(root, Rule.hard(3), self_k=10, counts=counts)  # v3
    assert hard["removed"] > 10
    weights = _weights(root, 3)
    q, _ = clustered(40, 16, len(CLASSES), seed=20)
    with Memory.open(root, 3) as mem:
        before = mem.classify(q, 12, "rank")
    assert compact_memory(root, pipeline_args=PIPE)["items_dropped"] == hard["removed"]  # v4
    assert mf.read_manifest(root).tombstones is None
    dead = _removed(root, 3)
    assert _weights(root, 4) == {i: w for i, w in weights.items() if i not in dead}
    with Memory.open(root) as mem:
        after = mem.classify(q, 12, "rank")
    np.testing.assert_array_equal(after.neighbours.ids, before.neighbours.ids)
    np.testing.assert_array_equal(after.scores, before.scores)


def test_soft_pruning_rebases_over_a_removal_and_gives_up_over_a_rewrite(tmp_path):
    x, labels, ids = _noisy(600, seed=23)
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, num_shards=2, class_names=CLASSES)
    counts = count_wrong(root, self_k=5)
    parent = mf.read_manifest(root)
    rewritten = {e.path: reweighted_shard(root, e, counts, Rule.soft(), (), version=2, token="t1")
                 for e in parent.shards}
    remove_items(root, ids=list(ids[:9]))  # v2, published while the prune was writing
    published = publish_soft(root, 1, rewritten, token="t1", detail={"mode": "soft"})
    assert published.version == 3 and published.change_detail["rebased"] == {"from": 1, "onto": 2}
    assert _removed(root, 3) == set(ids[:9])
    assert {s for s in removals.tombstones_by_shard(root, published)} <= {e.path for e in published.shards}
    with Memory.open(root) as mem:
        assert len(mem) == 591 and not set(mem.search(x, 10).ids.ravel()) & set(ids[:9])
    with pytest.raises(ConcurrentUpdate, match="run prune again"):  # its shards were replaced by version 3
        publish_soft(root, 1, rewritten, token="t2", detail={"mode": "soft"})
    assert mf.list_versions(root) == [1, 2, 3]
    first = prune_in_process(root, Rule.soft(), self_k=5)
    again = prune_in_process(root, Rule.soft(), self_k=5)  # same items, same v: weights are set, not multiplied
    assert first["changed"] and not again["changed"] and again["version"] == first["version"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--self-k", "5"], "one of the arguments --hard --soft is required"),
    (["--self-k", "5", "--hard", "3", "--soft"], "argument --soft: not allowed with argument --hard"),
    (["--hard", "3"], "the following arguments are required: --self-k"),
    (["--self-k", "0", "--soft"], "argument --self-k: must be an integer >= 1, got 0"),
    (["--self-k", "5", "--hard", "0"], "argument --hard: must be an integer >= 1, got 0"),
    (["--self-k", "5", "--hard", "-2"], "argument --hard: must be an integer >= 1, got -2"),
    (["--self-k", "5", "--soft", "--dd", "0"], "argument --dd: must be a number > 0, got 0"),
    (["--self-k", "5", "--soft", "--c", "-1"], "argument --c: must be a number >= 0, got -1"),
])
def test_usage_errors(tmp_path, capsys, argv, message):
    from cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tmp_path), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["{m}", "--self-k", "30", "--soft"], "(version 1) has 30 live items: self-k 30 needs at least 31"),
    (["{m}", "--self-k", "45", "--hard", "2"], "has 30 live items: self-k 45 needs at least 46"),
    (["{m}", "--self-k", "5", "--hard", "3", "--c", "2"], "--c and --dd set soft pruning's gamma = dd / (c + v)"),
    (["{m}", "--self-k", "5", "--soft", "--probe-shards", "2"], "probe_shards needs a k-means partitioned memory"),
    (["{tmp}/none", "--self-k", "5", "--soft"], "no memory at"),
])
def test_bad_input_is_one_line_and_publishes_nothing(tmp_path, capsys, argv, message):
    from cli.main import main

    x, labels, ids = _noisy(30, seed=29)
    root = str(tmp_path / "m")
    write_memory(root, x, labels, ids, num_shards=2, class_names=CLASSES)
    argv = [a.format(m=root, tmp=tmp_path) for a in argv]
    assert main(["prune", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vismem prune: error: ") and err.count("\n") == 1 and message in err, err
    assert mf.list_versions(root) == [1] and os.listdir(os.path.join(root, "shards")) == ["v00000001"]
    assert not os.path.exists(os.path.join(root, "leases")) or not os.listdir(os.path.join(root, "leases"))


def test_library_refusals():
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="threshold must be an integer >= 1"):
            Rule.hard(bad)
    with pytest.raises(ValueError, match="dd \\(gamma = dd / \\(c \\+ v\\)\\) must be a finite number > 0"):
        Rule.soft(dd=0.0)
    with pytest.raises(ValueError, match="c \\(gamma"):
        Rule.soft(c=float("nan"))
    with pytest.raises(ValueError, match="unknown pruning mode 'medium'"):
        Rule("medium")
    with pytest.raises(ValueError, match="self_k .* must be an integer >= 1"):
        check_self_k(True)
    with pytest.raises(ValueError, match="give exactly one of --hard THRESHOLD"):
        prune_memory("/nowhere", self_k=5)
