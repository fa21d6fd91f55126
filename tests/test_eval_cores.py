"""Evaluation cores against hand-computed cases: metrics, the scaling-law fitter, pruning counts."""
import numpy as np
import pytest

from eval import metrics, pruning, scaling
from memory import voting

LABELS = np.array([[1, 0, 0], [2, 2, 1], [0, 1, 1]])
SIMS = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7], [0.9, 0.8, 0.7]])
TRUTH = np.array([0, 2, 1])


def test_accuracy_all_k_by_hand():
    acc = metrics.accuracy_all_k(LABELS, SIMS, TRUTH, num_classes=3, methods=("plurality", "rank"))
    # k=1: preds 1, 2, 0 -> 1/3.  k=2: tie 1-0 -> nearest wins: 1, 2, 0 -> 1/3.  k=3: 0, 2, 1 -> 1.
    np.testing.assert_allclose(acc["plurality"], [1 / 3, 1 / 3, 1.0])
    # rank, k=3: row 0: class 1 = 1/2, class 0 = 1/3 + 1/4 = 7/12 -> 0 (right); row 2: 1/2 vs 7/12 -> 1.
    np.testing.assert_allclose(acc["rank"], [1 / 3, 1 / 3, 1.0])


def test_hit_rate_and_reliability_by_hand():
    np.testing.assert_allclose(metrics.hit_rate(LABELS, TRUTH), [1 / 3, 1.0, 1.0])
    np.testing.assert_allclose(metrics.neighbour_reliability(LABELS, TRUTH), [1 / 3, 1.0, 2 / 3])


def test_fit_log_recovers_coefficients():
    i = np.arange(1, 101)
    a, b = metrics.fit_log(-0.05 * np.log(i) + 0.8)
    assert a == pytest.approx(-0.05) and b == pytest.approx(0.8)
    with pytest.raises(ValueError, match="at least 2 values"):
        metrics.fit_log([0.5])


def test_calibration_by_hand():
    labels = np.array([[0, 0, 0, 0], [1, 1, 0, 2], [2, 2, 2, 2]])
    truth = np.array([0, 0, 1])
    cal = metrics.calibration(labels, truth, num_classes=3, k=4)
    assert cal["count"] == {2: (0.0, 1), 4: (0.5, 2)}
    edges, acc, n = cal["certainty"]
    # Rows 0 and 2 are certain (entropy 0 -> certainty 1, last bin); row 1 has p = (1/4, 1/2, 1/4).
    assert n[-1] == 2 and acc[-1] == 0.5
    p = np.array([0.25, 0.5, 0.25])
    c1 = 1 + (p * np.log(p)).sum() / np.log(3)
    assert n[int(c1 * 10)] == 1 and acc[int(c1 * 10)] == 0.0


def test_scaling_law_fitter_recovers_paper_coefficients():
    a, b = scaling.PAPER_FITS["dinov2-vit-l14"]
    sizes = np.array([1e3, 1e4, 1e5, 1e6, 1e7, 1e9])
    errors = 10 ** (a * np.log10(np.log10(sizes)) + b)
    fa, fb = scaling.fit_scaling_law(sizes, errors)
    assert fa == pytest.approx(a, abs=1e-9) and fb == pytest.approx(b, abs=1e-9)
    np.testing.assert_allclose(scaling.predict_error(sizes, fa, fb), errors)
    gof = scaling.goodness_of_fit(sizes, errors, fa, fb)
    assert gof["r2_log"] == pytest.approx(1.0) and gof["max_abs_error_points"] < 1e-9
    # By hand: log10(log10(1.28e6)) = 0.78583; -0.9434 * 0.78583 + 2.0704 = 1.32904 -> 21.33 %.
    assert scaling.predict_error([1.28e6], a, b)[0] == pytest.approx(21.33, abs=0.01)


def test_scaling_law_rejects_bad_input():
    with pytest.raises(ValueError, match="two or more"):
        scaling.fit_scaling_law([1000], [20.0])
    with pytest.raises(ValueError, match="percentages"):
        scaling.fit_scaling_law([1000, 10000], [0.0, 20.0])
    with pytest.raises(ValueError, match="must exceed 10"):
        scaling.fit_scaling_law([5, 1000], [30.0, 20.0])


def test_soft_weights_match_the_design_numbers():
    np.testing.assert_allclose(pruning.soft_weights([0, 1, 10, 100]), [1.0, 0.875, 1.75 / 11, 1.75 / 101])
    np.testing.assert_allclose(pruning.soft_weights([1, 10, 100]), [0.875, 0.159, 0.017], atol=5e-4)
    assert pruning.hard_keep([0, 127, 128, 300], 128).tolist() == [True, True, False, False]


def test_wrong_contributions_leave_self_out():
    items = np.array(["a", "b", "c", "d"])
    labels = np.array([0, 0, 1, 1])
    # Self-query at K' = 3: each item finds itself first (except "d", whose duplicate "c" ties ahead).
    nb_ids = np.array([["a", "b", "c"], ["b", "a", "d"], ["c", "d", "a"], ["c", "d", "b"]])
    nb_labels = np.vectorize(dict(zip(items, labels)).get)(nb_ids)
    v = pruning.wrong_contributions(items, labels, nb_ids, nb_labels, items, k=2)
    # a: neighbours b (right), c (wrong -> c+1). b: a (right), d (wrong -> d+1).
    # c: d (right), a (wrong -> a+1). d: c (right), b (wrong -> b+1).
    assert v.tolist() == [1, 1, 1, 1]
    v1 = pruning.wrong_contributions(items, labels, nb_ids, nb_labels, items, k=1)
    assert v1.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="k \\+ 1"):
        pruning.wrong_contributions(items, labels, nb_ids, nb_labels, items, k=3)


def test_scoring_every_rule_and_k_is_vectorised_and_consistent():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, (500, 40))
    sims = np.sort(rng.uniform(0, 1, (500, 40)), axis=1)[:, ::-1]
    truth = rng.integers(0, 5, 500)
    acc = metrics.accuracy_all_k(labels, sims, truth, num_classes=5)
    for method in voting.METHODS:
        direct = (voting.predict(labels, sims, method=method, num_classes=5, k=17) == truth).mean()
        assert acc[method][16] == pytest.approx(direct)


def test_hierarchy_places_queries_by_ks_test():
    import os

    from eval import hierarchy
    from pipelines.sources import FASHION_MNIST_CLASSES

    tree_path = os.path.join(os.path.dirname(hierarchy.__file__), "trees", "fashion_mnist.json")
    tree = hierarchy.load_tree(tree_path, FASHION_MNIST_CLASSES)
    assert tree.depth() == 2 and sorted(tree.leaves()) == sorted(FASHION_MNIST_CLASSES)
    with pytest.raises(ValueError, match="classes not in the tree \\['Hat'\\], tree leaves that are not classes \\['Bag'\\]"):
        hierarchy.load_tree(tree_path, [c for c in FASHION_MNIST_CLASSES if c != "Bag"] + ["Hat"])

    # A tree with two groups of two classes; each class a tight blob, groups far apart.
    rng = np.random.default_rng(0)
    centres = np.array([[1, 0, 0, 0], [0.9, 0.43, 0, 0], [0, 0, 1, 0], [0, 0, 0.9, 0.43]], dtype=float)
    labels = np.repeat(np.arange(4), 60)
    emb = centres[labels] + 0.05 * rng.standard_normal((240, 4))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    small = hierarchy.parse_tree({"name": "root", "children": [
        {"name": "g0", "children": [{"name": "a"}, {"name": "b"}]},
        {"name": "g1", "children": [{"name": "c"}, {"name": "d"}]}]})
    names = ["a", "b", "c", "d"]
    q = centres[3] + 0.05 * rng.standard_normal(4)
    q /= np.linalg.norm(q)
    assert hierarchy.predict_path(q, small, emb, labels, names) == ["g1", "d"]
    # Class d never seen: the query still lands in its group.
    keep = labels != 3
    assert hierarchy.predict_path(q, small, emb[keep], labels[keep], names)[0] == "g1"
    acc = hierarchy.level_accuracy([["g1", "d"], ["g1", "c"]], ["d", "d"], small)
    assert acc == [1.0, 0.5]


def test_count_calibration_is_binned_into_at_most_ten_rows():
    labels = np.array([[0, 0, 0, 0], [1, 1, 0, 2], [2, 2, 2, 2]])
    cal = metrics.calibration(labels, np.array([0, 0, 1]), num_classes=3, k=4)
    assert cal["count_bins"] == [(2, 2, 0.0, 1), (4, 4, 0.5, 2)]  # k <= 10: one count per row
    rng = np.random.default_rng(5)
    labels = np.where(rng.random((400, 100)) < 0.6, rng.integers(0, 3, (400, 1)), rng.integers(0, 3, (400, 100)))
    truth = rng.integers(0, 3, 400)
    cal = metrics.calibration(labels, truth, num_classes=3, k=100)
    rows = cal["count_bins"]
    assert len(rows) <= 10 and sum(n for *_, n in rows) == 400
    for lo, hi, acc, n in rows:  # each row pools the per-count rows of its range
        assert (hi - lo + 1, (lo - 1) % 10) == (10, 0)
        pooled = [(a, m) for c, (a, m) in cal["count"].items() if lo <= c <= hi]
        assert n == sum(m for _, m in pooled) > 0
        assert acc == pytest.approx(sum(a * m for a, m in pooled) / n)


def test_reliability_and_ece_by_hand():
    conf = np.array([0.95, 0.85, 0.85, 0.62, 0.55, 0.3, 1.0])
    correct = np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool)
    r = metrics.reliability(conf, correct)
    # Bins of width 0.1: 0.3 opens bin 3, 1.0 closes bin 9.
    assert r["count"].tolist() == [0, 0, 0, 1, 0, 1, 1, 0, 2, 2]
    np.testing.assert_allclose(r["confidence"][[3, 5, 6, 8, 9]], [0.3, 0.55, 0.62, 0.85, 0.975])
    np.testing.assert_allclose(r["accuracy"][[3, 5, 6, 8, 9]], [0.0, 0.0, 1.0, 0.5, 1.0])
    assert np.isnan(r["accuracy"][[0, 1, 2, 4, 7]]).all()
    # ECE = (1 * 0.3 + 1 * 0.55 + 1 * 0.38 + 2 * 0.35 + 2 * 0.025) / 7 = 1.98 / 7
    assert r["ece"] == pytest.approx(1.98 / 7)
    # Every tenth lands in the bin it opens (no float slip below the edge).
    tenths = np.arange(11) / 10
    assert metrics.reliability(tenths, np.ones(11, bool))["count"].tolist() == [1] * 9 + [2]
    perfect = metrics.reliability([0.25, 0.25, 0.25, 0.25, 1.0], [True, False, False, False, True])
    assert perfect["ece"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        metrics.reliability([1.2], [True])
    with pytest.raises(ValueError, match="two \\(Q,\\) arrays"):
        metrics.reliability([0.5, 0.5], [True])


def test_risk_coverage_by_hand_with_tied_confidences():
    conf = np.array([0.9, 0.5, 0.9, 0.7, 0.5, 0.2])
    correct = np.array([1, 0, 0, 1, 1, 0], dtype=bool)
    rc = metrics.risk_coverage(conf, correct)
    # Tied queries are answered together: 0.9 -> 2 answered (1 right), 0.7 -> 3 (2), 0.5 -> 5 (3), 0.2 -> 6 (3).
    assert rc["threshold"].tolist() == [0.9, 0.7, 0.5, 0.2]
    assert rc["answered"].tolist() == [2, 3, 5, 6]
    np.testing.assert_allclose(rc["coverage"], [2 / 6, 3 / 6, 5 / 6, 1.0])
    np.testing.assert_allclose(rc["accuracy"], [1 / 2, 2 / 3, 3 / 5, 1 / 2])
    np.testing.assert_allclose(rc["risk"], 1 - rc["accuracy"])
    at = metrics.accuracy_at_coverage(conf, correct, 0.9)  # needs 6 of 6 (5.4 rounded up)
    assert at == {"target": 0.9, "threshold": 0.2, "coverage": 1.0, "accuracy": 0.5, "answered": 6}
    at = metrics.accuracy_at_coverage(conf, correct, 0.8)  # needs 5: the tied 0.5 pair comes in together
    assert (at["answered"], at["threshold"], at["accuracy"]) == (5, 0.5, 0.6)
    assert metrics.accuracy_at_coverage(conf, correct, 0.6)["answered"] == 5  # 4 needed, ties give 5
    # The order of the queries cannot change the curve.
    perm = np.random.default_rng(0).permutation(6)
    again = metrics.risk_coverage(conf[perm], correct[perm])
    for key in rc:
        np.testing.assert_array_equal(again[key], rc[key])
    with pytest.raises(ValueError, match="coverage must be in"):
        metrics.accuracy_at_coverage(conf, correct, 0.0)


def test_risk_coverage_is_a_monotone_threshold_sweep():
    rng = np.random.default_rng(9)
    conf = rng.integers(0, 8, 500) / 7  # coarse: many ties
    correct = rng.random(500) < conf  # more confident, more often right
    rc = metrics.risk_coverage(conf, correct)
    assert np.all(np.diff(rc["threshold"]) < 0) and np.all(np.diff(rc["coverage"]) > 0)
    assert rc["coverage"][-1] == 1.0 and rc["accuracy"][-1] == correct.mean()
    for t, cov, acc in zip(rc["threshold"], rc["coverage"], rc["accuracy"]):
        answered = conf >= t  # what abstain_below=t answers
        assert cov == answered.mean() and acc == pytest.approx(correct[answered].mean())
    at = metrics.accuracy_at_coverage(conf, correct, 0.9)
    assert at["coverage"] >= 0.9 and (conf > at["threshold"]).mean() < 0.9  # the smallest set covering 90%
