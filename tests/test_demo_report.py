"""The demo report (``demo.report.write_report``) over a real evaluation's output; the demo's other stages are
stood in for by their figures (they have their own tests, and the whole demo runs in test_demo_pipeline)."""
import os

from conftest import clustered
from demo.config import DemoConfig
from demo.report import write_report
from eval.evaluate import evaluate
from memory import schema, voting, write_memory

PARTS = {  # the experiments' figures, as their parts carry them
    "pruning": {"figures": {"accuracy": {"none": {"rank": 0.80}, "hard v>=2": {"rank": 0.81}, "soft": {"rank": 0.83}}}},
    "new-classes": {"figures": {"old_before": 0.90, "old_after": 0.895, "new_after": 0.7, "new_classes": ["c4"]}},
    "scaling": {"figures": {"a": None}},
    "unlearning": {"figures": {"forget_hits_after": 0, "equals_rebuilt": True}},
}


def test_the_demo_report_states_the_accuracy_at_90_percent_coverage(tmp_path):
    x, labels = clustered(800, 16, 5, seed=37, noise=1.0)
    write_memory(str(tmp_path / "m"), x[:600], labels[:600], [f"m{i}" for i in range(600)],
                 class_names=[f"c{i}" for i in range(5)])
    schema.write_embeddings(str(tmp_path / "q.parquet"),
                            schema.embedding_table([f"q{i}" for i in range(200)], x[600:], labels[600:]))
    cfg = DemoConfig(str(tmp_path / "demo"), 600, 200, 0.5, 32, 1, "exact", 20, ())
    summary = evaluate(str(tmp_path / "m"), str(tmp_path / "q.parquet"), cfg.report_dir, k_max=20)
    with open(os.path.join(cfg.report_dir, "experiments.md"), "w") as f:
        f.write("# Capability experiments\n")
    pseudo = {"pseudo_labelled": 100, "accuracy_vs_hidden_labels": 0.9, "mean_confidence": 0.8, "human_rows": 500}
    path = write_report(cfg, train_summary={}, pseudo=pseudo, timings={"embed_s": 1.0},
                        explained={"queries": 3, "images": 9}, parts=PARTS)
    report = open(path).read()
    (line,) = [line for line in report.splitlines() if line.startswith("- Accuracy at 90% coverage")]
    for method in voting.METHODS:
        c = summary["confidence"][method]
        assert (f"{method} {100 * c['accuracy_at_90_coverage']:.2f}% (all queries {100 * c['accuracy']:.2f}%, "
                f"k = {c['k']}, abstain below {c['threshold_at_90']:.3f}, ECE {c['ece']:.3f})") in line
    assert any(c["accuracy_at_90_coverage"] != c["accuracy"] for c in summary["confidence"].values())
    assert report.index("## Findings, honestly") < report.index(line) < report.index("# Evaluation")
    assert "## Confidence: calibration and abstention" in report  # the evaluation's section, kept
