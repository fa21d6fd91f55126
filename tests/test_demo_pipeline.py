"""The demo pipeline end to end on a few hundred real images: Ray embed, teacher, Beam build, eval, experiments."""
import json
import os

from demo.run import run_demo


def test_demo_end_to_end_on_a_few_hundred_images(tmp_path):
    out = str(tmp_path / "demo")
    summary = run_demo(out, train=400, test=120, num_shards=2, image_size=32, k_max=50)
    report = open(summary["report"]).read()
    for section in ("## Findings, honestly", "**Honest figure**", "Memory-size scaling", "New classes without training",
                    "Unlearning (section 3.4)", "Memory pruning", "A newly discovered class",
                    "Memory-size scaling by encoder", "A larger encoder needs less memory", "Accuracy at 90% coverage",
                    "## Confidence: calibration and abstention"):
        assert section in report, section
    # Pseudo-labels were produced and scored against the hidden labels.
    assert summary["pseudo_labels"]["pseudo_labelled"] > 150
    assert 0.3 < summary["pseudo_labels"]["accuracy_vs_hidden_labels"] <= 1.0
    # Unlearning leaves nothing behind; the memory was built by Beam with the human + pool rows.
    unlearn = json.load(open(os.path.join(out, "report", "unlearning.json")))
    assert unlearn["forget_hits_after"] == 0 and unlearn["equals_rebuilt"] is True
    assert os.path.exists(os.path.join(out, "report", "why.html"))
    # The same images embedded by three encoders (Ray jobs), compared on the same nested subsets.
    by_encoder = json.load(open(os.path.join(out, "report", "scaling-encoders.json")))
    assert set(by_encoder["encoders"]) == {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"}
    assert all(c["params_m"] > 3 and c["images_per_s"] > 0 for c in by_encoder["costs"].values())
    assert os.path.exists(os.path.join(out, "report", "scaling_by_encoder.png"))
    assert all(0.3 < v["test_accuracy"] <= 1.0 for v in summary["held_out_choice"].values())
    # A re-run reuses the cached embeddings and the built memory.
    again = run_demo(out, train=400, test=120, num_shards=2, image_size=32, k_max=50)
    assert again["timings_s"]["build_s"] < 1.0
