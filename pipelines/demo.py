"""``vismem demo``: the memory-core path end to end on real data and a real encoder.

Fashion-MNIST images are embedded with EfficientNet-Lite0 (ImageNet weights), written as a sharded
memory, reopened from disk, and the test images are classified with every voting rule. This is the
smaller path of the memory-core issue: the Ray embedding job and the Beam build replace its
in-process embedding and write as they land.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from memory import schema, voting
from memory.memory import Memory, write_memory
from pipelines.encoders import load_encoder
from pipelines.sources import FASHION_MNIST_CLASSES, fashion_mnist


def _embed(encoder, images, batch_size=64, desc="embed"):
    from tqdm import tqdm

    out = np.empty((len(images), encoder.dim), np.float32)
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        out[i:i + batch_size] = encoder.embed(images[i:i + batch_size])
    return out


def run_demo(out_dir: str, *, memory_size: int = 2000, num_queries: int = 500, num_shards: int = 4,
             encoder_name: str = "efficientnet-lite0", image_size: int = 64, k_max: int = 50,
             backend: str = "exact", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    mem_rows = np.sort(rng.choice(len(train_x), memory_size, replace=False))
    q_rows = np.sort(rng.choice(len(test_x), num_queries, replace=False))
    encoder = load_encoder(encoder_name, image_size)
    t0 = time.perf_counter()
    mem_emb = _embed(encoder, train_x[mem_rows], desc="embed memory")
    q_emb = _embed(encoder, test_x[q_rows], desc="embed queries")
    embed_s = time.perf_counter() - t0
    ids = np.array([f"fashion-mnist/train/{i:05d}" for i in mem_rows], dtype=object)
    memory_path = os.path.join(out_dir, "memory")
    os.makedirs(out_dir, exist_ok=True)
    schema.write_embeddings(os.path.join(out_dir, "queries.parquet"), schema.embedding_table(
        [f"fashion-mnist/test/{i:05d}" for i in q_rows], q_emb, test_y[q_rows],
        metadata={"encoder": encoder.name, "encoder_version": encoder.version}))
    if os.path.exists(os.path.join(memory_path, "manifests")):
        import shutil
        shutil.rmtree(memory_path)
    write_memory(memory_path, mem_emb, train_y[mem_rows], ids, num_shards=num_shards, backend=backend,
                 class_names=FASHION_MNIST_CLASSES,
                 encoder={"name": encoder.name, "version": encoder.version, "image_size": image_size})
    with Memory.open(memory_path) as mem:
        t1 = time.perf_counter()
        nb = mem.search(q_emb, k_max)
        search_s = time.perf_counter() - t1
    truth = test_y[q_rows]
    table = {}
    for method in voting.METHODS:
        acc = (voting.predict_all_k(nb.labels, nb.sims, method=method, num_classes=10) == truth[:, None]).mean(0)
        table[method] = {"k=1": float(acc[0]), "k=10": float(acc[9]), "best_k": int(acc.argmax() + 1),
                         "best": float(acc.max())}
    summary = {
        "what": "memory-core demo: real Fashion-MNIST, real EfficientNet-Lite0 weights, sharded exact memory",
        "memory": memory_path, "memory_size": memory_size, "queries": num_queries, "shards": num_shards,
        "encoder": encoder_name, "image_size": image_size, "backend": backend,
        "embed_images_per_s": round((memory_size + num_queries) / embed_s, 1),
        "search_queries_per_s": round(num_queries / search_s, 1),
        "top1_accuracy_by_rule (best k chosen on these queries)": table,
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the end-to-end demo on Fashion-MNIST",
        description="Embed a sample of Fashion-MNIST with EfficientNet-Lite0, write a sharded memory, "
        "reopen it and classify test images with every voting rule. About 1-2 minutes on 2 CPU cores. "
        "Needs the Debian package dataset-fashion-mnist (make demo installs it).",
        epilog="example: vismem demo --out demo-out --memory-size 2000 --queries 500",
    )
    p.add_argument("--out", default="demo-out", help="output directory (memory, queries, summary.json)")
    p.add_argument("--memory-size", type=int, default=2000, help="training images put in memory")
    p.add_argument("--queries", type=int, default=500, help="test images classified")
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--backend", choices=["exact", "scann"], default="exact")
    p.add_argument("--image-size", type=int, default=64, help="encoder input size (64 px: ~60 images/s)")
    p.set_defaults(func=lambda a: run_demo(a.out, memory_size=a.memory_size, num_queries=a.queries,
                                           num_shards=a.num_shards, backend=a.backend,
                                           image_size=a.image_size))
