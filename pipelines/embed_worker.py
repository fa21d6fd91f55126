"""What runs on the Ray workers of ``vismem embed``: decode an input shard, embed and pseudo-label it, write it.

The pure core (:func:`decode_shard`, :class:`ShardProcessor`) works on numpy arrays and is tested
without Ray; :class:`EncoderWorker` and :class:`Progress` are the Ray actors that run it.
"""
from __future__ import annotations

import os
import time

import numpy as np

from memory import schema
from pipelines import outputs
from pipelines.embed_summary import COUNT_KEYS
from pipelines.images import DEFAULT_MAX_PIXELS, BadImage, pixels_of
from pipelines.sources import InputShard, Source


def decode_shard(source: Source, shard: InputShard, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Read and decode one input shard: pixels of the good records, reasons for the bad ones.

    Returns:
        ``ids``, ``uris`` (object arrays), ``labels``, ``true_labels`` (int32, -1 unknown), ``images``
        (uint8, ``(N, H, W)`` or ``(N, H, W, 3)``), ``errors`` (list of ``(id, uri, reason)``), ``read``.
    """
    ids, uris, labels, truth, pixels, errors = [], [], [], [], [], []
    read = 0
    for rec in source.read(shard):
        read += 1
        try:
            px = pixels_of(rec.payload, image_size, max_pixels)
        except BadImage as exc:
            errors.append((rec.id, rec.uri, str(exc)))
            continue
        ids.append(rec.id)
        uris.append(rec.uri)
        labels.append(rec.label)
        truth.append(rec.true_label)
        pixels.append(px)
    images = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)
    return {
        "ids": np.asarray(ids, dtype=object), "uris": np.asarray(uris, dtype=object),
        "labels": np.asarray(labels, dtype=np.int32), "true_labels": np.asarray(truth, dtype=np.int32),
        "images": images, "errors": errors, "read": read,
    }


class ShardProcessor:
    """Embeds a decoded shard batch by batch, pseudo-labels its unlabelled rows, builds the output table.

    Args:
        encoder: a loaded :class:`pipelines.encoders.Encoder`.
        teacher: a :class:`pipelines.teachers.Teacher` (already bound to ``encoder``) or ``None``.
        label_map: teacher class to memory class (:class:`pipelines.teachers.LabelMap`), with a teacher.
        min_confidence: pseudo-labels below this teacher probability are dropped (and counted).
    """

    def __init__(self, encoder, teacher=None, label_map=None, *, min_confidence: float = 0.0,
                 batch_size: int = 64, dtype: str = "float32", source_name: str = ""):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if teacher is not None and label_map is None:
            raise ValueError("a teacher needs a label map")
        self.encoder, self.teacher, self.label_map = encoder, teacher, label_map
        self.min_confidence = float(min_confidence)
        self.batch_size, self.dtype, self.source_name = batch_size, dtype, source_name

    def embed(self, images: np.ndarray, unlabelled: np.ndarray, on_batch=None):
        """``(embeddings, teacher classes, teacher confidences)``; the teacher only sees ``unlabelled`` rows."""
        import torch

        n = len(images)
        emb = np.empty((n, self.encoder.dim), np.float32)
        t_cls = np.full(n, -1, np.int64)
        t_conf = np.zeros(n, np.float32)
        for a in range(0, n, self.batch_size):
            b = min(n, a + self.batch_size)
            emb[a:b], feats = self.encoder.embed_with_features(images[a:b])
            rows = np.flatnonzero(unlabelled[a:b])
            if self.teacher is not None and len(rows):
                c, p = self.teacher.classify(images[a:b][rows], feats[torch.as_tensor(rows)])
                t_cls[a + rows], t_conf[a + rows] = c, p
            if on_batch is not None:
                on_batch(b - a)
        return emb, t_cls, t_conf

    def process(self, shard_name: str, decoded: dict, metadata: dict, on_batch=None):
        """``(table, errors, stats)`` for one decoded shard; ``errors`` rows match ``outputs.ERRORS_SCHEMA``."""
        t0 = time.perf_counter()
        labels, truth = decoded["labels"], decoded["true_labels"]
        unlabelled = labels < 0
        emb, t_cls, t_conf = self.embed(decoded["images"], unlabelled, on_batch)
        # An all-zero (or non-finite) embedding has no direction to search by: e.g. EfficientNet-Lite2
        # at 32 px maps some near-blank images to all-zero features. Quarantined, never written.
        degenerate = ~np.isfinite(emb).all(axis=1) | (np.linalg.norm(np.nan_to_num(emb), axis=1) < 1e-6)
        out_labels, label_source, confidence, keep, stats = self._label(labels, truth, t_cls, t_conf, degenerate)
        stats.update(read=int(decoded["read"]), quarantined=len(decoded["errors"]) + int(degenerate.sum()),
                     embedded=int(keep.sum()),
                     human_labelled=int((~unlabelled & keep).sum()), hidden_labels=int((truth >= 0).sum()),
                     encode_seconds=round(time.perf_counter() - t0, 3))
        table = schema.embedding_table(
            decoded["ids"][keep], emb[keep], out_labels[keep], dtype=self.dtype,
            provenance={"label_source": label_source[keep], "confidence": confidence[keep],
                        "source": np.full(int(keep.sum()), self.source_name, dtype=object),
                        "uri": decoded["uris"][keep]},
            metadata={**metadata, "input_shard": shard_name})
        errors = [(i, u, r, shard_name, self.source_name) for i, u, r in decoded["errors"]]
        reason = (f"encoder {getattr(self.encoder, 'name', 'encoder')} gave an all-zero or non-finite embedding "
                  "(no direction to search by)")
        errors += [(decoded["ids"][r], decoded["uris"][r], reason, shard_name, self.source_name)
                   for r in np.flatnonzero(degenerate)]
        return table, errors, stats

    def _label(self, labels, truth, t_cls, t_conf, degenerate):
        """``(labels, label sources, confidences, rows kept, label counts)``: human labels as they are,
        unlabelled rows pseudo-labelled by the teacher (or kept with label -1 when there is none)."""
        n = len(labels)
        unlabelled = labels < 0
        out_labels = labels.astype(np.int32).copy()
        label_source = np.full(n, "human", dtype=object)
        confidence = np.ones(n, np.float32)
        keep = ~degenerate
        stats = dict.fromkeys(COUNT_KEYS, 0)
        if self.teacher is None:
            confidence[unlabelled] = 0.0  # no label and no teacher: kept, label -1, confidence 0
            stats["unlabelled"] = int((unlabelled & keep).sum())
            return out_labels, label_source, confidence, keep, stats
        mapped = self.label_map.apply(t_cls)
        no_match = unlabelled & (mapped < 0)
        low = unlabelled & (mapped >= 0) & (t_conf < self.min_confidence)
        pseudo = unlabelled & ~no_match & ~low & ~degenerate
        out_labels[pseudo] = mapped[pseudo]
        label_source[pseudo] = "teacher"
        confidence[unlabelled] = t_conf[unlabelled]
        keep &= ~(no_match | low)
        evaluated = pseudo & (truth >= 0)
        stats.update(pseudo_labelled=int(pseudo.sum()), excluded_no_correspondence=int(no_match.sum()),
                     below_confidence=int(low.sum()), pseudo_evaluated=int(evaluated.sum()),
                     pseudo_correct=int((out_labels[evaluated] == truth[evaluated]).sum()))
        return out_labels, label_source, confidence, keep, stats


class Progress:
    """A Ray actor counting images done across workers; the driver polls it for the progress bar."""

    def __init__(self):
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def get(self) -> int:
        return self.done


class EncoderWorker:
    """A Ray actor: loads the encoder (and teacher) once, then processes whole input shards.

    Only names, paths and small dicts cross the process boundary; models are built here. ``class_names``:
    the source's, recorded in every shard's schema metadata (``memory.schema.CLASS_NAMES_KEY``).
    """

    def __init__(self, encoder: str, image_size: int, teacher: str | None, label_map: dict | None,
                 min_confidence: float, batch_size: int, dtype: str, threads: int, device: str, out: str,
                 source_name: str, class_names=()):
        import torch

        from pipelines.encoders import load_encoder
        from pipelines.teachers import LabelMap, load_teacher

        torch.set_num_threads(max(1, threads))
        self.encoder = load_encoder(encoder, image_size, device=device)
        teacher_obj = None
        if teacher:
            teacher_obj = load_teacher(teacher)
            teacher_obj.bind(self.encoder)
        self.processor = ShardProcessor(self.encoder, teacher_obj, LabelMap(label_map) if teacher else None,
                                        min_confidence=min_confidence, batch_size=batch_size, dtype=dtype,
                                        source_name=source_name)
        # One batch through the network at the run's shape builds the kernels once, before any shard arrives.
        self.encoder.embed(np.zeros((batch_size, image_size, image_size, 3), np.uint8))
        self.layout = outputs.OutputLayout(out)
        # The source's class names travel with every shard (memory.schema), so a build needs no --class-names.
        self.metadata = {**self.encoder.spec.to_metadata(), "teacher": teacher_obj.name if teacher_obj else "",
                         **schema.class_names_metadata(class_names)}

    def ready(self) -> dict:
        return {"spec": self.encoder.spec, "dim": self.encoder.dim, "device": self.encoder.device, "pid": os.getpid()}

    def process(self, shard: InputShard, decoded: dict, progress) -> dict:
        if decoded["errors"]:
            progress.add.remote(len(decoded["errors"]))
        table, errors, stats = self.processor.process(shard.name, decoded, self.metadata,
                                                      on_batch=lambda n: progress.add.remote(n))
        self.layout.write_shard(shard.name, table, errors, stats)
        return {"shard": shard.name, **stats}
