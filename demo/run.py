"""``run_demo``: the demo's stages in order (embed, pseudo-label, build, evaluate, experiments, report)."""
from __future__ import annotations

import contextlib
import json
import os
import time

from demo.config import DemoConfig
from demo.experiments import run_experiments
from demo.inputs import embed, first_shard, pseudo_label
from demo.report import write_report
from eval.evaluate import evaluate
from eval.explain import explain_page
from memory import manifest as mf
from memory import schema
from pipelines.build import build_memory
from pipelines.progress import SILENT
from pipelines.sources import FASHION_MNIST_CLASSES


def run_demo(out_dir: str = "demo-out", *, train: int = 6000, test: int = 1000, unlabelled_fraction: float = 0.5,
             image_size: int = 64, num_shards: int = 4, backend: str = "scann", k_max: int = 100,
             full: bool = False, compare_encoders=("efficientnet-lite1", "efficientnet-lite2"),
             progress=SILENT) -> dict:
    """Run every stage into ``out_dir``, reusing cached embeddings and memory; write ``report/report.md``.

    ``progress`` (``pipelines.progress``) shows one line per stage and the report's path.

    Returns the summary also written to ``out_dir/summary.json``: the report's path, stage times, the
    pseudo-labels' figures and the evaluation's held-out choice of hyper-parameters.
    """
    if full:
        train, test = 60_000, 10_000
    cfg = DemoConfig(out_dir, train, test, unlabelled_fraction, image_size, num_shards, backend, k_max,
                     tuple(compare_encoders))
    t0 = time.perf_counter()
    timings = {}
    os.makedirs(out_dir, exist_ok=True)
    with _timed(timings, "embed_s", progress, "embed (Ray)"):
        train_summary = embed("train", cfg.emb_train, limit=train, image_size=image_size,
                              unlabelled_fraction=unlabelled_fraction)
        embed("test", cfg.emb_test, limit=test, image_size=image_size)
    pseudo = pseudo_label(cfg.emb_train, cfg.emb_memory, image_size)
    with _timed(timings, "build_s", progress, "build (Beam)"):
        if mf.latest_version(cfg.memory) is None:
            build_memory(cfg.emb_memory, cfg.memory, num_shards=num_shards, class_names=FASHION_MNIST_CLASSES,
                         backend=backend)
    with _timed(timings, "eval_s", progress, "evaluate"):
        eval_summary = evaluate(cfg.memory, os.path.join(cfg.emb_test, "embeddings"), cfg.report_dir, k_max=k_max)
    with _timed(timings, "experiments_s", progress, "experiments"):
        parts = run_experiments(cfg)
        explained = explain_page(cfg.memory, schema.read_embeddings(first_shard(cfg.emb_test)),
                                 os.path.join(cfg.report_dir, "why.html"), rows=[0, 1, 2], misclassified=5)
    timings["total_s"] = time.perf_counter() - t0
    path = write_report(cfg, train_summary=train_summary, pseudo=pseudo, timings=timings, explained=explained,
                        parts=parts)
    summary = {"report": os.path.abspath(path), "timings_s": timings, "pseudo_labels": pseudo,
               "held_out_choice": eval_summary["held_out_choice"]}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    progress.note(f"report: {os.path.abspath(path)}")
    return summary


@contextlib.contextmanager
def _timed(timings: dict, name: str, progress=SILENT, stage: str | None = None):
    """Record the seconds the block took under ``timings[name]``; one progress line for the stage."""
    start = time.perf_counter()
    with progress.stage(stage or name, rate=False):
        yield
    timings[name] = time.perf_counter() - start
