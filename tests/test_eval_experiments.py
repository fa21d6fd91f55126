"""Each capability experiment on a tiny memory with a known answer."""
import numpy as np
import pytest

from conftest import clustered
from eval import hierarchy
from eval.experiments import granularity, new_classes, pruning, scaling
from eval.experiments.common import Split
from eval.plots import plot_scaling
from test_eval_plots import assert_plotted

NAMES = [f"c{i}" for i in range(6)]


def _splits(seed=41, noise=0.5):
    x, labels = clustered(1500, 16, 6, seed=seed, noise=noise)
    ids = np.array([f"i{i:05d}" for i in range(1500)], dtype=object)
    return Split(x[:1200], labels[:1200], ids[:1200]), Split(x[1200:], labels[1200:], ids[1200:])


def test_pruning_experiment_counts_and_excludes():
    memory, queries = _splits()
    # Flip 60 labels: mislabelled items collect wrong contributions and get pruned.
    noisy = memory.labels.copy()
    flip = np.arange(0, 1200, 20)
    noisy[flip] = (noisy[flip] + 1) % 6
    res = pruning.run(Split(memory.embeddings, noisy, memory.ids), queries, NAMES, k=10, self_k=10,
                      hard_thresholds=(3, 6))
    acc = res["figures"]["accuracy"]
    assert acc["none"]["items_pruned"] == 0 and acc["hard v>=3"]["items_pruned"] >= 40
    # Mislabelled items hurt plurality voting at k = 10 less once pruned.
    assert acc["hard v>=3"]["plurality"] >= acc["none"]["plurality"]
    assert acc["soft"]["rank"] >= acc["none"]["rank"] - 0.01
    assert "| soft |" in res["report"]


def test_scaling_experiment_error_falls_and_fit_follows():
    memory, queries = _splits(noise=0.9)
    res = scaling.run(memory, queries, NAMES, k=5, sizes=[12, 40, 150, 600, 1200])
    err = res["figures"]["error_percent"]
    assert err[0] > err[-1] and len(err) == 5
    assert res["figures"]["a"] < 0  # error falls with memory size
    assert "Fit `log10(e)" in res["report"]


def test_scaling_by_encoder_compares_on_the_same_items_and_inverts_the_fit(tmp_path):
    from eval import scaling as law
    from eval.experiments import common

    memory, queries = _splits(noise=0.9)
    sharper = _splits(noise=0.75)  # a "stronger encoder": the same ids, tighter clusters
    shuffled = np.random.default_rng(0).permutation(len(memory))  # another file order
    res = scaling.compare_encoders(
        {"weak": (memory, queries, {"params_m": 4.7, "images_per_s": 250}),
         "strong": (sharper[0].take(shuffled), sharper[1], {"params_m": 6.1})}, NAMES, k=5, steps=5)
    runs = res["figures"]["encoders"]
    assert res["figures"]["sizes"] == scaling.nested_sizes(1200, 6, 5)
    # Aligned by id, each series equals its own single run at the same sizes.
    alone = scaling.run(sharper[0], sharper[1], NAMES, k=5, sizes=res["figures"]["sizes"])["figures"]
    assert runs["strong"]["error_percent"] == alone["error_percent"]
    assert runs["strong"]["error_percent"][-1] < runs["weak"]["error_percent"][-1]
    (trade,) = res["figures"]["trade_off"]
    assert trade["encoder"] == "weak" and trade["matches"] == "strong"
    # The memory the weak encoder needs is where its own fit predicts the strong encoder's error.
    predicted = law.predict_error([trade["memory_needed"]], runs["weak"]["a"], runs["weak"]["b"])[0]
    assert predicted == pytest.approx(trade["error_percent"], rel=1e-6)
    assert "| weak | 4.7 | 250 |" in res["report"] and "| strong | 6.1 | - |" in res["report"]
    common.write_part(str(tmp_path), "scaling-encoders", res)
    with pytest.warns(UserWarning, match="No artists"):  # the same axes with no series
        empty = plot_scaling(str(tmp_path / "empty"), "scaling_by_encoder.png", res["figures"]["sizes"], {})
    assert_plotted(tmp_path / "scaling_by_encoder.png", tmp_path / "empty" / empty, series=2)
    # An item one encoder quarantined leaves every series.
    short = scaling.compare_encoders({"a": (memory.take(np.arange(1, 1200)), queries, None),
                                      "b": (sharper[0], sharper[1].take(np.arange(299)), None)}, NAMES, k=5, steps=3)
    assert (short["figures"]["items"], short["figures"]["queries"]) == (1199, 299)
    with pytest.raises(ValueError, match="does not hold the same memory items"):
        scaling.compare_encoders({"a": (memory, queries, None), "b": (memory.take(np.arange(10)), queries, None)},
                                 NAMES)


def test_new_classes_experiment_including_another_dataset():
    memory, queries = _splits(noise=0.3)
    # "Another dataset": two more clusters, split into memory items and queries.
    other, other_labels = clustered(300, 16, 2, seed=77, noise=0.3)
    other_ids = np.array([f"x{i}" for i in range(300)], dtype=object)
    extra_mem = Split(other[:200], other_labels[:200], other_ids[:200])
    extra_q = Split(other[200:], other_labels[200:], other_ids[200:])
    res = new_classes.run(memory, queries, NAMES, ["c5"], k=5, extra=(extra_mem, extra_q, ["digit-0", "digit-1"]))
    fig = res["figures"]
    assert fig["new_classes"] == ["c5", "digit-0", "digit-1"]
    assert fig["new_items_added"] == int((memory.labels == 5).sum()) + 200
    assert fig["old_before"] > 0.95 and fig["new_after"] > 0.9
    assert abs(fig["old_after"] - fig["old_before"]) < 0.02


def test_granularity_experiment_places_unseen_class_in_its_group():
    rng = np.random.default_rng(0)
    centres = np.array([[1, 0, 0, 0], [0.9, 0.43, 0, 0], [0, 0, 1, 0], [0, 0, 0.9, 0.43]], dtype=float)
    lab = np.repeat(np.arange(4), 80)
    x = centres[lab] + 0.05 * rng.standard_normal((320, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.array([f"i{i}" for i in range(320)], dtype=object)
    mem, q = Split(x[::2], lab[::2], ids[::2]), Split(x[1::2], lab[1::2], ids[1::2])
    tree = hierarchy.parse_tree({"name": "root", "children": [
        {"name": "g0", "children": [{"name": "a"}, {"name": "b"}]},
        {"name": "g1", "children": [{"name": "c"}, {"name": "d"}]}]})
    res = granularity.run(mem, q, ["a", "b", "c", "d"], tree, "d", exemplars=(0, 5, 40), max_queries=20)
    fig = res["figures"]
    assert fig[0][0] == 1.0 and fig[0][1] == 0.0  # right group, but class d is unknown
    assert fig[40] == [1.0, 1.0]


def test_experiment_commands_write_report_parts(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from memory import schema

    memory, queries = _splits(noise=0.5)
    mem_dir = tmp_path / "mem"
    mem_dir.mkdir()
    for i in range(2):  # two shards in a directory, as the embedding job writes them
        rows = slice(i * 600, (i + 1) * 600)
        schema.write_embeddings(str(mem_dir / f"part-{i}.parquet"), schema.embedding_table(
            memory.ids[rows], memory.embeddings[rows], memory.labels[rows]))
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table(queries.ids, queries.embeddings, queries.labels))
    vismem = os.path.join(os.path.dirname(sys.executable), "vismem")
    out = tmp_path / "report"
    names = ",".join(NAMES)
    for args in (["scaling", "--label", "a", "--compare", f"b={mem_dir},{tmp_path / 'q.parquet'}"],
                 ["pruning", "--thresholds", "3"], ["new-classes", "--new", "c1"]):
        res = subprocess.run([vismem, "experiment", *args, str(mem_dir), str(tmp_path / "q.parquet"), "--out",
                              str(out), "--class-names", names], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    report = open(out / "experiments.md").read()
    for title in ("Memory-size scaling", "Memory-size scaling by encoder", "Memory pruning",
                  "New classes without training"):
        assert title in report
    figures = json.load(open(out / "new-classes.json"))
    assert figures["new_classes"] == ["c1"] and figures["new_items_added"] == int((memory.labels == 1).sum())


def test_unlearning_experiment_forgets_exactly():
    from eval.experiments import unlearning

    memory, queries = _splits(noise=0.7)
    res = unlearning.run(memory, queries, NAMES, forget_fraction=0.1, k=10, num_shards=3)
    fig = res["figures"]
    assert fig["forget_items"] > 80 and fig["removed"] == fig["forget_items"]
    assert fig["forget_hits_before"] > 0 and fig["forget_hits_after"] == 0
    assert fig["equals_rebuilt"] is True
    assert "**yes**" in res["report"]


def test_voting_experiments_take_the_tie_rule():
    """Each voting experiment's figures are those of a direct vote under the rule asked for."""
    from eval.experiments import common, unlearning
    from memory import voting

    memory, queries = _splits(seed=43, noise=1.3)  # overlapping clusters: tied plurality votes at k = 4
    nb = common.neighbours(memory, queries.embeddings, 4 + 100, NAMES)
    direct = {t: voting.predict(nb.labels, nb.sims, method="plurality", num_classes=6, k=4, ties=t)
              for t in voting.TIES}
    assert (direct["leader"] != direct["nearest"]).any()  # the rule matters on this data
    leader_acc = float((direct["leader"] == queries.labels).mean())
    pr = pruning.run(memory, queries, NAMES, k=4, self_k=4, hard_thresholds=(3,), ties="leader")
    assert pr["figures"]["accuracy"]["none"]["plurality"] == leader_acc
    assert "ties settled by the running leader" in pr["report"]
    sc = scaling.run(memory, queries, NAMES, k=4, method="plurality", sizes=[12, 1200], ties="leader")
    assert sc["figures"]["error_percent"][-1] == pytest.approx(100 * (1 - leader_acc))
    un = unlearning.run(memory, queries, NAMES, forget_fraction=0.1, k=4, method="plurality", num_shards=2,
                        ties="leader")
    assert un["figures"]["accuracy_before"] == leader_acc
    assert un["figures"]["equals_rebuilt"] is True
    # new-classes: "after" (every class in memory) is the direct vote, on the old classes' queries.
    nc = new_classes.run(memory, queries, NAMES, ["c5"], k=4, method="plurality", ties="leader")
    old = queries.labels != 5
    assert nc["figures"]["old_after"] == pytest.approx(float((direct["leader"][old] == queries.labels[old]).mean()))
    for run, kw in ((pruning.run, {}), (scaling.run, {"sizes": [12]}), (unlearning.run, {}),
                    (new_classes.run, {"new_classes": ["c5"]})):
        with pytest.raises(ValueError, match="unknown tie rule 'foo'"):
            run(memory, queries, NAMES, ties="foo", **kw)


def test_the_ties_option_of_eval_and_experiment(tmp_path, capsys):
    import json

    from cli.main import main
    from memory import schema, write_memory

    memory, queries = _splits(seed=43, noise=1.3)
    schema.write_embeddings(str(tmp_path / "m.parquet"),
                            schema.embedding_table(memory.ids, memory.embeddings, memory.labels))
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table(queries.ids, queries.embeddings, queries.labels))
    args = [str(tmp_path / "m.parquet"), str(tmp_path / "q.parquet"), "--class-names", ",".join(NAMES), "--k", "4"]
    assert main(["experiment", "pruning", *args, "--out", str(tmp_path / "x"), "--thresholds", "3",
                 "--ties", "leader"]) == 0
    assert "ties settled by the running leader" in (tmp_path / "x" / "report-pruning.md").read_text()
    leader = json.loads((tmp_path / "x" / "pruning.json").read_text())["accuracy"]["none"]["plurality"]
    assert main(["experiment", "pruning", *args, "--out", str(tmp_path / "y"), "--thresholds", "3"]) == 0
    assert "running leader" not in (tmp_path / "y" / "report-pruning.md").read_text()
    nearest = json.loads((tmp_path / "y" / "pruning.json").read_text())["accuracy"]["none"]["plurality"]
    assert leader != nearest  # the option reached the vote (tied plurality votes at k = 4 on this data)
    write_memory(str(tmp_path / "mem"), memory.embeddings, memory.labels, memory.ids, class_names=NAMES)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "mem"), str(tmp_path / "q.parquet"), "--out", str(tmp_path / "e"),
                 "--k-max", "8", "--ties", "leader"]) == 0
    assert json.loads(capsys.readouterr().out)["ties"] == "leader"
    for verb in (["eval", str(tmp_path / "mem"), str(tmp_path / "q.parquet"), "--out", str(tmp_path / "f")],
                 ["experiment", "scaling", *args, "--out", str(tmp_path / "f")]):
        with pytest.raises(SystemExit) as exc:
            main([*verb, "--ties", "foo"])
        assert exc.value.code == 2 and "--ties: invalid choice: 'foo'" in capsys.readouterr().err
