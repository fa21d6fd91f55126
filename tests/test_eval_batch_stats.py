"""The streamed evaluation's pure cores: per-batch statistics that add up to the whole, exact selection, batch reads.

Oracle: the in-process metrics over every query at once. Added up from any split into batches, the
statistics must give the same figures to the last bit (exact integer sums), not approximately.
"""
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from eval import batch_stats, calibration, metrics, query_batches, selection
from eval.evaluate import honest_choice, sweep_accuracy
from memory import schema, voting


def _neighbours(q=600, k=12, classes=5, seed=0):
    """Random neighbour lists with exclusions (-1), soft weights and many tied votes (few classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, (q, k))
    labels[rng.random((q, k)) < 0.05] = -1
    sims = np.sort(rng.uniform(0.2, 0.95, (q, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    weights = np.where(rng.random((q, k)) < 0.2, 0.5, 1.0).astype(np.float32)
    truth = rng.integers(0, classes, q)
    return labels, sims, weights, truth


def _split(n, rng):
    cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(1, 8), replace=False))
    return np.split(np.arange(n), cuts)


@pytest.mark.parametrize("ties", voting.TIES)
def test_batch_statistics_add_up_to_the_whole_to_the_last_bit(ties):
    labels, sims, weights, truth = _neighbours()
    ids = [f"q{i}" for i in range(len(truth))]
    tune = batch_stats.held_out_tune(ids, 3)
    total = None
    for part in _split(len(truth), np.random.default_rng(1)):
        total = batch_stats.merge(total, batch_stats.query_stats(labels[part], sims[part], weights[part], truth[part],
                                                                 tune[part], num_classes=5, ties=ties))
    n = len(truth)
    assert int(total["n"]) == n and int(total["n_tune"]) == tune.sum()
    whole = sweep_accuracy(labels, sims, truth, 5, weights, ties)
    merged = batch_stats.sweeps_from(total["correct"], n)
    for method in whole:
        for value in whole[method]:
            np.testing.assert_array_equal(merged[method][value], whole[method][value])
    np.testing.assert_array_equal(total["hits"] / n, metrics.hit_rate(labels, truth))
    np.testing.assert_array_equal(total["rank_correct"] / n, metrics.neighbour_reliability(labels, truth))
    cal = metrics.calibration_from_counts({k: total[k] if k != "k" else int(total["cal_k"]) for k in
                                           ("k", "top_n", "top_correct", "certainty_n", "certainty_correct")})
    want = metrics.calibration(labels, truth, num_classes=5, k=100, ties=ties)
    assert cal["count"] == want["count"] and cal["count_bins"] == want["count_bins"]
    np.testing.assert_array_equal(cal["certainty"][1], want["certainty"][1])
    np.testing.assert_array_equal(metrics.mean_distance(total["dist_units"], total["dist_n"]),
                                  metrics.mean_distance(*metrics.distance_sums(sims)))
    # The held-out choice from counts is the in-process one.
    assert batch_stats.honest_from(total, 3) == honest_choice(labels, sims, truth, 5, tune=tune, seed=3,
                                                              weights=weights, ties=ties)


def test_the_held_out_split_is_a_hash_of_the_id():
    ids = [f"query-{i}" for i in range(4000)]
    tune = batch_stats.held_out_tune(ids, 0)
    assert 1850 < tune.sum() < 2150  # about half
    # Any order, any batch: the same query, the same half; another seed, another split.
    perm = np.random.default_rng(0).permutation(4000)
    np.testing.assert_array_equal(batch_stats.held_out_tune([ids[i] for i in perm], 0), tune[perm])
    np.testing.assert_array_equal(batch_stats.held_out_tune(ids[:7], 0), tune[:7])
    assert (batch_stats.held_out_tune(ids, 1) != tune).sum() > 1500
    with pytest.raises(ValueError, match="both halves of its split"):
        batch_stats.check_split(0, 3, seed=0)


def test_distance_sums_are_exact_in_any_order():
    rng = np.random.default_rng(4)
    sims = rng.uniform(-1, 1, (5000, 30)).astype(np.float32)
    sims[3, 5] = -np.inf  # padding: left out
    units, n = metrics.distance_sums(sims)
    assert n[5] == 4999 and n[0] == 5000
    rev_units, _ = metrics.distance_sums(sims[::-1])
    np.testing.assert_array_equal(units, rev_units)
    exact = np.array([math.fsum(1.0 - sims[np.isfinite(sims[:, j]), j].astype(np.float64)) for j in range(30)])
    # Each distance rounded to 2**-32: the mean is within 2**-33 of the exact one.
    np.testing.assert_allclose(metrics.mean_distance(units, n), exact / n, rtol=0, atol=2.0 ** -33)


def test_reliability_sums_confidences_exactly():
    rng = np.random.default_rng(5)
    conf = rng.random(3000) ** 0.3
    correct = rng.random(3000) < conf
    r = metrics.reliability(conf, correct)
    which = np.minimum((conf * 10).astype(int), 9)
    for b in range(10):
        inside = which == b
        if inside.any():  # the correctly rounded sum (math.fsum), then one division
            assert r["confidence"][b] == math.fsum(conf[inside]) / inside.sum()
    halves = [metrics.confidence_bins(conf[:1234], correct[:1234]),
              metrics.confidence_bins(conf[1234:], correct[1234:])]
    merged = metrics.reliability_from_bins(batch_stats.merge(batch_stats.merge(None, halves[0]), halves[1]))
    for key in ("count", "confidence", "accuracy"):
        np.testing.assert_array_equal(merged[key], r[key])
    assert merged["ece"] == r["ece"]


@pytest.mark.parametrize("kind", ["continuous", "discrete", "one value"])
def test_exact_selection_gives_the_coverage_points_of_a_sort(kind):
    rng = np.random.default_rng(6)
    n = 3001
    conf = {"continuous": rng.random(n) ** 0.1, "discrete": rng.integers(0, 11, n) / 10,
            "one value": np.full(n, 0.5)}[kind]
    conf[:2] = [1.0, 0.0]
    correct = rng.random(n) < conf
    parts = _split(n, rng)
    coverages = calibration.COVERAGES + (0.001, 0.333)
    got = selection.coverage_points(lambda: ((conf[p], correct[p]) for p in parts), coverages)
    assert got == [metrics.accuracy_at_coverage(conf, correct, c) for c in coverages]
    with pytest.raises(ValueError, match="no confidences"):
        selection.coverage_points(lambda: iter(()), (0.9,))


def test_confidence_figures_from_batches_equal_those_of_every_query_at_once():
    labels, sims, weights, truth = _neighbours(q=900, k=20, seed=8)
    best = {m: {"k": k} for m, k in zip(voting.METHODS, (5, 9, 20, 13))}
    whole = calibration.confidence_figures(labels, sims, truth, num_classes=5, best=best, weights=weights)
    parts = _split(len(truth), np.random.default_rng(9))
    for method, chosen in best.items():
        per = [calibration.confidence_at_k(labels[p], sims[p], truth[p], method=method, k=chosen["k"], num_classes=5,
                                           weights=weights[p]) for p in parts]
        bins = hist = None
        for conf, correct in per:
            bins = batch_stats.merge(bins, metrics.confidence_bins(conf, correct))
            h = metrics.coverage_histogram(conf, correct)
            hist = h if hist is None else (hist[0] + h[0], hist[1] + h[1])
        points = selection.coverage_points(lambda: iter(per), calibration.COVERAGES)
        fig = calibration.figure(chosen["k"], bins, hist, points)
        assert fig["accuracy"] == whole[method]["accuracy"] and fig["at_coverage"] == whole[method]["at_coverage"]
        for key in ("count", "confidence", "accuracy"):
            np.testing.assert_array_equal(fig["reliability"][key], whole[method]["reliability"][key])
        for key in ("coverage", "accuracy", "threshold"):
            np.testing.assert_array_equal(fig["risk_coverage"][key], whole[method]["risk_coverage"][key])


def test_batches_are_read_from_the_file_once_whatever_its_row_groups(tmp_path):
    """Batches cut across row groups of another size read the rows ``read_embeddings`` reads."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1000, 6)).astype(np.float32)
    labels = rng.integers(-1, 3, 1000)
    table = schema.embedding_table([f"r{i}" for i in range(1000)], x, labels, dtype="float16")
    path = str(tmp_path / "q.parquet")
    pq.write_table(table, path, row_group_size=170)
    (info,) = query_batches.describe([path])
    assert (info.rows, info.dim, info.label_min, info.label_max) == (1000, 6, labels.min(), labels.max())
    whole = schema.read_embeddings(path)
    batches = query_batches.plan([info], 64)
    assert len(batches) == 16 and batches[-1].stop == 1000 and batches[3].key == "q-00000-000003"
    wanted = [b for b in batches if b.index % 3 != 1]  # skipping some, as a resumed run does
    got = list(query_batches.read_batches(wanted))
    assert [b for b, _ in got] == wanted
    for b, rows in got:
        np.testing.assert_array_equal(rows["embeddings"], whole["embeddings"][b.start:b.stop])
        np.testing.assert_array_equal(rows["labels"], whole["labels"][b.start:b.stop])
        assert rows["ids"].tolist() == whole["ids"][b.start:b.stop].tolist()
    assert [len(t) for t in query_batches.tasks(batches, 5)] == [5, 5, 5, 1]


def test_the_door_refuses_an_unlabelled_query_set_naming_the_file(tmp_path):
    from memory import manifest as mf
    from memory import write_memory

    x = np.random.default_rng(11).standard_normal((50, 4)).astype(np.float32)
    write_memory(str(tmp_path / "m"), x, np.arange(50) % 2, [f"m{i}" for i in range(50)], class_names=["a", "b"])
    path = str(tmp_path / "unlabelled.parquet")
    schema.write_embeddings(path, schema.embedding_table([f"q{i}" for i in range(20)], x[:20], [-1] * 20))
    infos = query_batches.describe([path])
    with pytest.raises(ValueError, match=f"^{path} has no labelled rows") as err:
        query_batches.check(infos, mf.read_manifest(str(tmp_path / "m")), str(tmp_path / "m"), path)
    assert "\n" not in str(err.value)
