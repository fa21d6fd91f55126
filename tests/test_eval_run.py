"""``vismem eval`` on a small memory: figures equal direct computations, plots and report written."""
import json
import os

import numpy as np
import pytest

from conftest import clustered
from eval.evaluate import evaluate
from memory import schema, voting, write_memory
from test_eval_plots import (CONFIDENCE_PLOT_SERIES, EVAL_PLOT_SERIES, assert_plotted, empty_confidence_plots,
                             empty_eval_plots)


def test_eval_writes_consistent_figures(tmp_path):
    x, labels = clustered(2400, 16, 6, seed=31, noise=0.6)
    write_memory(str(tmp_path / "m"), x[:2000], labels[:2000], [f"m{i}" for i in range(2000)], num_shards=3,
                 class_names=[f"c{i}" for i in range(6)])
    qpath, oodpath = str(tmp_path / "q.parquet"), str(tmp_path / "ood.parquet")
    schema.write_embeddings(qpath, schema.embedding_table([f"q{i}" for i in range(400)], x[2000:], labels[2000:]))
    ood, _ = clustered(50, 16, 3, seed=99)
    schema.write_embeddings(oodpath, schema.embedding_table([f"o{i}" for i in range(50)], ood, [-1] * 50))
    out = str(tmp_path / "eval")
    summary = evaluate(str(tmp_path / "m"), qpath, out, k_max=40, ood_queries_path=oodpath)

    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    by_k = {(r["method"], r["k"]): r["accuracy"] for r in records if r["figure"] == "accuracy_by_k"}
    # The figure at k equals a direct vote with the memory's own search at that k.
    from memory import Memory
    with Memory.open(str(tmp_path / "m")) as mem:
        nb = mem.search(x[2000:], 40)
    for method in voting.METHODS:
        for k in (1, 7, 40):
            direct = (voting.predict(nb.labels, nb.sims, method=method, num_classes=6, k=k) == labels[2000:]).mean()
            assert by_k[(method, k)] == direct
        best = summary["best_k_on_eval_set"][method]
        assert best["accuracy"] == max(by_k[(method, k)] for k in range(1, 41))
    honest = [r for r in records if r["figure"] == "held_out_choice"]
    assert len(honest) == 4 and all(r["tune_n"] + r["test_n"] == 400 for r in honest)
    assert all(0.5 < r["test_accuracy"] <= 1.0 for r in honest)
    hit = [r["value"] for r in records if r["figure"] == "hit_rate"]
    assert all(b >= a for a, b in zip(hit, hit[1:])) and hit[0] == by_k[("plurality", 1)]
    dist = [r for r in records if r["figure"] == "distance_by_neighbour"]
    # Out-of-distribution queries sit farther from their neighbours than in-distribution ones.
    assert all(r["out_of_distribution"] > r["in_distribution"] for r in dist)
    report = open(os.path.join(out, "report.md")).read()
    assert "Honest figure" in report
    for r in honest:  # every held-out figure is in the report's table, in bold
        assert f"**{r['test_accuracy']:.4f}**" in report
    empty = empty_eval_plots(tmp_path / "empty", 40)
    for name, series in EVAL_PLOT_SERIES.items():
        # distances.png also draws the out-of-distribution series here.
        assert_plotted(os.path.join(out, name), os.path.join(empty, name), series + (name == "distances.png"))
        assert f"]({name})" in report


def test_eval_refuses_unlabelled_queries(tmp_path):
    x, labels = clustered(100, 8, 2, seed=5)
    write_memory(str(tmp_path / "m"), x, labels, [f"m{i}" for i in range(100)], class_names=["a", "b"])
    schema.write_embeddings(str(tmp_path / "q.parquet"), schema.embedding_table(["q"], x[:1], [-1]))
    try:
        evaluate(str(tmp_path / "m"), str(tmp_path / "q.parquet"), str(tmp_path / "o"), k_max=5)
    except ValueError as exc:
        assert "no labelled rows" in str(exc)
    else:
        raise AssertionError("unlabelled queries were accepted")


def test_routed_eval_on_a_kmeans_memory(tmp_path):
    from memory import Memory
    from pipelines.build import build_memory

    x, labels = clustered(1700, 16, 12, seed=21, noise=0.6)
    ids = np.array([f"m{i}" for i in range(1500)], dtype=object)
    schema.write_embeddings(str(tmp_path / "m.parquet"), schema.embedding_table(ids, x[:1500], labels[:1500] % 4))
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(200)], x[1500:], labels[1500:] % 4))
    mem, queries = str(tmp_path / "mem"), str(tmp_path / "q.parquet")
    build_memory(str(tmp_path / "m.parquet"), mem, num_shards=4, class_names=list("abcd"), partition="kmeans",
                 kmeans_cells=16, backend="exact", pipeline_args=["--direct_running_mode=in_memory"])
    everywhere = evaluate(mem, queries, str(tmp_path / "all"), k_max=20)
    routed = evaluate(mem, queries, str(tmp_path / "p1"), k_max=20, probe_shards=1)
    visit_all = evaluate(mem, queries, str(tmp_path / "p4"), k_max=20, probe_shards=4)
    assert visit_all["best_k_on_eval_set"] == everywhere["best_k_on_eval_set"]
    # The routed figures are those of the routed neighbours, computed directly.
    with Memory.open(mem) as m:
        nb = m.search(x[1500:], 20, probe_shards=1)
    want = voting.predict(nb.labels, nb.sims, method="rank", num_classes=4, k=routed["best_k_on_eval_set"]["rank"]["k"])
    assert routed["best_k_on_eval_set"]["rank"]["accuracy"] == pytest.approx(float((want == labels[1500:] % 4).mean()))
    assert "searched only its 1 nearest shards" in open(routed["report"]).read()
    with pytest.raises(ValueError, match="probe_shards needs a k-means partitioned memory"):
        write_memory(str(tmp_path / "h"), x[:100], labels[:100] % 4, ids[:100], class_names=list("abcd"))
        evaluate(str(tmp_path / "h"), queries, str(tmp_path / "h-out"), k_max=5, probe_shards=1)


def test_eval_with_the_released_codes_tie_rule(tmp_path):
    from eval.evaluate import held_out_tune, honest_choice
    from memory import Memory

    x, labels = clustered(900, 16, 4, seed=33, noise=1.2)  # overlapping clusters: many tied votes
    write_memory(str(tmp_path / "m"), x[:600], labels[:600], [f"m{i}" for i in range(600)], num_shards=2,
                 class_names=list("abcd"))
    qpath = str(tmp_path / "q.parquet")
    schema.write_embeddings(qpath, schema.embedding_table([f"q{i}" for i in range(300)], x[600:], labels[600:]))
    with pytest.raises(ValueError, match="unknown tie rule 'foo'"):
        evaluate(str(tmp_path / "m"), qpath, str(tmp_path / "bad"), k_max=12, ties="foo")
    assert not os.path.exists(tmp_path / "bad")
    out = str(tmp_path / "eval")
    summary = evaluate(str(tmp_path / "m"), qpath, out, k_max=12, ties="leader")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    by_k = {(r["method"], r["k"]): r["accuracy"] for r in records if r["figure"] == "accuracy_by_k"}
    with Memory.open(str(tmp_path / "m")) as mem:
        nb = mem.search(x[600:], 12)
    differ = 0
    for method in voting.METHODS:
        for k in range(1, 13):
            leader = voting.predict(nb.labels, nb.sims, method=method, num_classes=4, k=k, ties="leader")
            nearest = voting.predict(nb.labels, nb.sims, method=method, num_classes=4, k=k)
            assert by_k[(method, k)] == (leader == labels[600:]).mean(), (method, k)
            differ += int((leader != nearest).sum())
    assert differ > 0  # the figures above really depend on the tie rule
    tune = held_out_tune([f"q{i}" for i in range(300)], 0)  # the split is a hash of each query's id
    want = honest_choice(nb.labels, nb.sims, labels[600:], 4, tune=tune, weights=nb.weights, ties="leader")
    honest = {r["method"]: r for r in records if r["figure"] == "held_out_choice"}
    assert all(honest[m]["test_accuracy"] == want[m]["test_accuracy"] for m in voting.METHODS)
    assert summary["ties"] == "leader" and {"figure": "voting", "ties": "leader"} in records
    assert "`--ties leader`" in open(summary["report"]).read()


def test_eval_reports_calibration_and_risk_coverage_per_rule(tmp_path):
    """The reliability diagrams, ECE and accuracy at 90% coverage equal a direct computation from the
    confidences ``Memory.classify`` gives at each rule's best k; tables and plots are written."""
    from memory import Memory

    x, labels = clustered(1300, 16, 5, seed=35, noise=1.0)  # overlapping clusters: confidences spread out
    write_memory(str(tmp_path / "m"), x[:1000], labels[:1000], [f"m{i}" for i in range(1000)], num_shards=2,
                 class_names=[f"c{i}" for i in range(5)])
    qpath, truth = str(tmp_path / "q.parquet"), labels[1000:]
    schema.write_embeddings(qpath, schema.embedding_table([f"q{i}" for i in range(300)], x[1000:], truth))
    out = str(tmp_path / "eval")
    summary = evaluate(str(tmp_path / "m"), qpath, out, k_max=30)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    report = open(summary["report"]).read()
    for method in voting.METHODS:
        k = summary["best_k_on_eval_set"][method]["k"]
        with Memory.open(str(tmp_path / "m")) as mem:
            res = mem.classify(x[1000:], k, method)
        conf, correct = res.confidence, res.predictions == truth
        if method == "plurality":  # the share of k votes, by hand
            counts = (res.neighbours.labels == res.predictions[:, None]).sum(axis=1)
            np.testing.assert_allclose(conf, counts / k, rtol=1e-12)
        # Reliability diagram: bins [b/10, (b+1)/10), the last closed; ECE their weighted gaps.
        bins = [r for r in records if r["figure"] == "reliability_diagram" and r["method"] == method]
        assert [r["bin"] for r in bins] == list(range(10)) and all(r["k"] == k for r in bins)
        ece = 0.0
        for r in bins:
            inside = (conf >= r["lo"] - 1e-12) & ((conf < r["hi"] - 1e-12) | (r["bin"] == 9))
            assert r["n"] == inside.sum(), (method, r)
            if r["n"]:
                assert r["mean_confidence"] == pytest.approx(conf[inside].mean())
                assert r["accuracy"] == pytest.approx(correct[inside].mean())
                ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
            else:
                assert r["mean_confidence"] is None and r["accuracy"] is None
        (got_ece,) = [r["ece"] for r in records
                      if r["figure"] == "expected_calibration_error" and r["method"] == method]
        assert got_ece == pytest.approx(ece) and summary["confidence"][method]["ece"] == pytest.approx(ece)
        # Accuracy at 90% coverage: the highest threshold that answers at least 270 of the 300 queries.
        order = np.sort(conf)[::-1]
        threshold = order[269]
        answered = conf >= threshold
        (at90,) = [r for r in records if r["figure"] == "risk_coverage" and r["method"] == method
                   and r["target"] == 0.9]
        assert at90["threshold"] == threshold and at90["answered"] == answered.sum() >= 270
        assert at90["accuracy"] == pytest.approx(correct[answered].mean())
        assert summary["confidence"][method]["accuracy_at_90_coverage"] == at90["accuracy"]
        (at100,) = [r for r in records if r["figure"] == "risk_coverage" and r["method"] == method
                    and r["target"] == 1.0]
        assert at100["accuracy"] == pytest.approx(summary["best_k_on_eval_set"][method]["accuracy"])
        assert f"Reliability diagram, {method} voting at k = {k} (ECE {ece:.4f})" in report
        assert f"| {method} | {k} | {ece:.4f} |" in report and f"**{at90['accuracy']:.4f}**" in report
    assert "| 90% | " in report and "## Confidence: calibration and abstention" in report
    assert 0 < len([r for r in records if r["figure"] == "calibration_count_binned"]) <= 10
    empty = empty_confidence_plots(tmp_path / "empty")
    for name, series in CONFIDENCE_PLOT_SERIES.items():
        assert_plotted(os.path.join(out, name), os.path.join(empty, name), series)
        assert f"]({name})" in report
