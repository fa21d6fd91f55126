"""The demo's experiment stage: every capability experiment of the paper, each writing its report part."""
from __future__ import annotations

import importlib.resources
import os

from demo.config import DemoConfig
from demo.inputs import encoder_cost, encoder_series, mnist_digits
from eval.experiments import common, granularity, new_classes, pruning, scaling, unlearning
from eval.hierarchy import load_tree
from pipelines.sources import FASHION_MNIST_CLASSES

TREE = str(importlib.resources.files("eval").joinpath("trees", "fashion_mnist.json"))


def run_experiments(cfg: DemoConfig) -> dict:
    """Run every experiment on the demo's embeddings; write each part under the report folder; return them."""
    human = common.read_split(os.path.join(cfg.emb_memory, "human.parquet"))
    everything = common.read_split(cfg.emb_memory)
    queries = common.read_split(os.path.join(cfg.emb_test, "embeddings"))
    names = list(FASHION_MNIST_CLASSES)
    parts = _scaling(cfg, human, everything, queries, names)
    digits_mem, digits_q = mnist_digits(cfg.image_size, 1000)
    parts["new-classes"] = new_classes.run(human, queries, names, ["Sandal", "Bag"],
                                           extra=(digits_mem, digits_q, [f"digit {d}" for d in range(10)]))
    common.write_part(cfg.report_dir, "new-classes", parts["new-classes"])
    parts["unlearning"] = unlearning.run(everything, queries, names, num_shards=cfg.num_shards)
    common.write_part(cfg.report_dir, "unlearning", parts["unlearning"])
    parts["pruning"] = pruning.run(everything, queries, names)
    common.write_part(cfg.report_dir, "pruning", parts["pruning"])
    parts["granularity"] = granularity.run(human, queries, names, load_tree(TREE, names), "Sneaker",
                                           max_queries=60)
    common.write_part(cfg.report_dir, "granularity", parts["granularity"])
    parts["label-sources"] = label_sources(cfg.memory, queries)
    common.write_part(cfg.report_dir, "label-sources", parts["label-sources"])
    return parts


def label_sources(memory: str, queries, k: int = 50) -> dict:
    """One memory searched twice: human labels only (a filter inside each shard) and everything."""
    from memory import Memory
    from memory.filters import ItemFilter

    where = ItemFilter.of(include={"label_source": "human"})
    acc = {}
    with Memory.open(memory) as mem:
        for name, w in (("human labels only", where), ("human + pseudo-labels", None)):
            res = mem.classify(queries.embeddings, k, "rank", where=w)
            acc[name] = float((res.predictions == queries.labels).mean())
    rows = "\n".join(f"| {n} | {100 * a:.2f}% |" for n, a in acc.items())
    report = ("## One memory, filtered by label source\n\n"
              f"The demo's memory searched with `--include label_source=human` and without it (rank voting, "
              f"k = {k}, {len(queries.labels)} test queries): the pseudo-labelled items are filtered out inside "
              f"each shard, no second memory is built.\n\n| items that vote | accuracy |\n| --- | --- |\n{rows}\n")
    return {"figures": {"k": k, "accuracy": acc}, "report": report}


def _scaling(cfg: DemoConfig, human, everything, queries, names) -> dict:
    """Memory-size scaling on the human labels, then with the pseudo-labelled pool, then by encoder."""
    parts = {"scaling": scaling.run(human, queries, names, label="EfficientNet-Lite0, human labels")}
    common.write_part(cfg.report_dir, "scaling", parts["scaling"])
    pool = scaling.run(everything, queries, names, label="EfficientNet-Lite0, human + pseudo-labelled pool")
    common.write_part(cfg.report_dir, "scaling-pool", pool)
    if cfg.compare_encoders:
        series = {"efficientnet-lite0": (human, queries, encoder_cost("efficientnet-lite0", cfg.image_size))}
        for name in cfg.compare_encoders:
            series[name] = encoder_series(cfg.out_dir, name, train=cfg.train, test=cfg.test,
                                          unlabelled_fraction=cfg.unlabelled_fraction, image_size=cfg.image_size)
        parts["scaling-encoders"] = scaling.compare_encoders(series, names)
        common.write_part(cfg.report_dir, "scaling-encoders", parts["scaling-encoders"])
    return parts
