"""The demo's ``report.md``: what ran and how long, the findings, then the evaluation and experiment parts."""
from __future__ import annotations

import json
import os

from demo.config import DemoConfig
from demo.findings import findings


def write_report(cfg: DemoConfig, *, train_summary: dict, pseudo: dict, timings: dict, explained: dict,
                 parts: dict) -> str:
    """Replace the evaluation's ``report.md`` by the whole demo report (the evaluation part kept); return its path."""
    lines = _header(cfg, train_summary, pseudo, timings, explained)
    lines += findings(os.path.join(cfg.report_dir, "metrics.jsonl"), parts)
    path = os.path.join(cfg.report_dir, "report.md")
    with open(path) as f:
        eval_part = f.read().replace("# Evaluation report", "# Evaluation")
    with open(os.path.join(cfg.report_dir, "experiments.md")) as f:
        experiments = f.read()
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + eval_part + "\n" + experiments)
    return path


def _header(cfg: DemoConfig, train_summary: dict, pseudo: dict, timings: dict, explained: dict) -> list[str]:
    compared = ", ".join(cfg.compare_encoders)
    return [
        "# vismem demo report", "",
        f"Fashion-MNIST: {cfg.train} training images ({100 * cfg.unlabelled_fraction:.0f}% treated as unlabelled and "
        f"pseudo-labelled by a teacher: a linear probe fit on the human-labelled embeddings), "
        f"{cfg.test} test images; EfficientNet-Lite0 embeddings at {cfg.image_size} px (Ray, local instance"
        f"{'; also ' + compared + ' for the by-encoder scaling' if cfg.compare_encoders else ''}); a "
        f"{cfg.num_shards}-shard {cfg.backend} memory built by the Beam DirectRunner. Sizes chosen to fit 15 minutes "
        f"on 2 CPU cores; `vismem demo --full` uses everything.", "",
        f"- Pseudo-labels: {pseudo['pseudo_labelled']} images labelled by the teacher, "
        f"**{100 * pseudo['accuracy_vs_hidden_labels']:.2f}% correct** against the hidden labels "
        f"(mean confidence {pseudo['mean_confidence']:.3f}); memory = {pseudo['human_rows']} human + "
        f"{pseudo['pseudo_labelled']} pseudo-labelled items.",
        f"- Embedding (Ray): train {json.dumps(train_summary.get('counts'))}; "
        f"throughput this run {json.dumps(train_summary.get('throughput'))}",
        "- Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        f"- Interpretability page: [why.html](why.html) ({explained['queries']} queries, {explained['images']} images)",
        "",
    ]
