"""Fit a linear-probe teacher on the human-labelled rows of an embedding run and save it."""
from __future__ import annotations

import json

import numpy as np

from memory import schema, storage
from memory.encoder_spec import EncoderSpec
from pipelines import outputs, teachers


def fit_probe_from_shards(shards: str, out: str, *, l2: float = 1e-4, max_iter: int = 200) -> dict:
    """Fit a linear probe on the human-labelled rows of an embedding run (or one shard file) and save it."""
    if storage.exists(storage.join(shards, "embeddings")):
        data = outputs.read_run(shards)
        summary_path = storage.join(shards, "summary.json")
    elif storage.exists(shards):
        data = schema.read_embeddings(shards)
        summary_path = None
    else:
        raise FileNotFoundError(f"no embedding run or shard at {shards}")
    spec = EncoderSpec.from_metadata(data["metadata"])
    if spec is None or spec.image_size is None:
        raise ValueError(f"{shards}: the shards do not say which encoder and image size made them")
    human = np.asarray(data["provenance"]["label_source"]) == "human"
    labels = np.where(human, data["labels"], -1)
    names = None
    if summary_path and storage.exists(summary_path):
        names = json.loads(storage.read_bytes(summary_path))["source"].get("class_names") or None
    probe = teachers.fit_probe(data["embeddings"], labels, encoder=spec.name, image_size=spec.image_size,
                               class_names=names, l2=l2, max_iter=max_iter)
    teachers.save_probe(out, probe)
    keep = labels >= 0
    train_acc = float((probe.logits(data["embeddings"][keep]).argmax(1) == labels[keep]).mean())
    return {"probe": out, "encoder": probe.encoder, "image_size": probe.image_size, "rows": int(keep.sum()),
            "classes": int(probe.weight.shape[0]), "train_accuracy": round(train_acc, 4)}
