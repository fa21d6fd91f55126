"""Teachers that pseudo-label unlabelled images, and label maps from teacher classes to memory classes.

A teacher has one small contract: ``bind(encoder)`` once per worker (it may reuse the worker's
encoder and its features instead of running a second network), then ``classify(images, features)``
returns ``(teacher class, probability)`` per image. A :class:`LabelMap` turns teacher classes into
memory classes; an image whose teacher class has no correspondence is excluded (and counted), as
the paper does with its ViT-22B teacher.

Specs (``--teacher``):
- ``efficientnet-lite0`` (``-lite1``, ``-lite2``): that network's real ImageNet classifier head; needs
  a label map (ImageNet class index to memory class).
- ``probe:PATH``: a linear probe saved by :func:`save_probe` (``vismem probe``), fit on human-labelled
  embeddings of some encoder (possibly a stronger one than the run's); its classes are memory classes.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from memory import storage

LABEL_MAP_DIR = os.path.join(os.path.dirname(__file__), "label_maps")


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Teacher class -> memory class; classes absent from the map have no correspondence."""

    mapping: dict

    @classmethod
    def identity(cls, num_classes: int) -> "LabelMap":
        return cls({i: i for i in range(num_classes)})

    def apply(self, teacher_classes: np.ndarray) -> np.ndarray:
        """Memory labels (int32), ``-1`` where the teacher class has no correspondence."""
        lut = np.full(max(self.mapping, default=-1) + 2, -1, dtype=np.int32)
        for t, m in self.mapping.items():
            lut[t] = m
        tc = np.asarray(teacher_classes, dtype=np.int64)
        inside = (tc >= 0) & (tc < len(lut) - 1)
        return np.where(inside, lut[np.clip(tc, 0, len(lut) - 2)], -1).astype(np.int32)


def load_label_map(path: str, num_teacher_classes: int | None = None) -> LabelMap:
    """Read a label map: JSON ``{"teacher class index": memory class index, ...}``, optionally nested
    under ``"map"`` (other keys, e.g. ``"names"``, are documentation). Checked at the door."""
    try:
        doc = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"label map not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"label map {path} is not valid JSON: {exc}") from None
    raw = doc.get("map", doc) if isinstance(doc, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"label map {path} must be a JSON object {{teacher class: memory class}} (or one under "
                         "'map'), non-empty")
    mapping = {}
    for key, value in raw.items():
        try:
            t, m = int(key), int(value)
        except (TypeError, ValueError):
            raise ValueError(f"label map {path}: entry {key!r}: {value!r} is not integer -> integer") from None
        if t < 0 or m < 0:
            raise ValueError(f"label map {path}: entry {key!r}: {value!r} has a negative class")
        if num_teacher_classes is not None and t >= num_teacher_classes:
            raise ValueError(f"label map {path}: teacher class {t} is out of range; the teacher has "
                             f"{num_teacher_classes} classes")
        mapping[t] = m
    return LabelMap(mapping)


def softmax_top1(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    probs = F.softmax(logits.float(), dim=1)
    conf, cls = probs.max(dim=1)
    return cls.cpu().numpy().astype(np.int64), conf.cpu().numpy().astype(np.float32)


class Teacher(abc.ABC):
    """The interface. ``name`` identifies it in outputs; ``num_classes`` bounds its label map."""

    name: str
    num_classes: int
    needs_label_map: bool = False

    def bind(self, encoder) -> None:
        """Called once per worker with the worker's encoder: share it or load a private one."""

    @abc.abstractmethod
    def classify(self, images: np.ndarray, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(teacher class, probability)`` per image."""


class ImageNetHeadTeacher(Teacher):
    """The ImageNet classifier head of an EfficientNet-Lite: a real 1000-class teacher, offline."""

    needs_label_map = True

    def __init__(self, encoder_name: str, image_size: int | None = None):
        if not encoder_name.startswith("efficientnet-lite"):
            raise ValueError(f"classifier-head teachers are the EfficientNet-Lite ImageNet heads; got {encoder_name!r}")
        self.name = f"{encoder_name}/imagenet-head"
        self.encoder_name = encoder_name
        self.image_size = image_size
        self.num_classes = 1000
        self._own = None
        self._shared = None

    def bind(self, encoder) -> None:
        if encoder.name == self.encoder_name and (self.image_size in (None, encoder.image_size)):
            self._shared = encoder  # one forward pass gives the embedding and the logits
        else:
            from pipelines.encoders import load_encoder

            self._own = load_encoder(self.encoder_name, self.image_size, device=encoder.device)

    @torch.inference_mode()
    def classify(self, images, features):
        if self._shared is not None:
            return softmax_top1(self._shared.head(features))
        if self._own is None:
            raise RuntimeError("teacher used before bind(encoder)")
        _, own = self._own.embed_with_features(images)
        return softmax_top1(self._own.head(own))


@dataclasses.dataclass
class Probe:
    """A linear softmax classifier on L2-normalised embeddings of ``encoder`` at ``image_size``."""

    weight: np.ndarray  # (C, dim)
    bias: np.ndarray  # (C,)
    encoder: str
    image_size: int
    class_names: list

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return embeddings.astype(np.float32) @ self.weight.T + self.bias


def fit_probe(embeddings: np.ndarray, labels: np.ndarray, *, encoder: str, image_size: int,
              class_names=None, l2: float = 1e-4, max_iter: int = 200) -> Probe:
    """Multinomial logistic regression (full-batch L-BFGS, L2 penalty) on labelled embeddings.

    Raises:
        ValueError: no labelled rows, or fewer than two classes.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    keep = y >= 0
    x, y = x[keep], y[keep]
    if len(y) == 0 or len(np.unique(y)) < 2:
        raise ValueError(f"a probe needs human-labelled rows of at least two classes; got {len(y)} rows of "
                         f"{len(np.unique(y))} class(es)")
    num_classes = int(y.max()) + 1
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w.T + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    return Probe(w.detach().numpy().copy(), b.detach().numpy().copy(), encoder, int(image_size), names)


def save_probe(path: str, probe: Probe) -> None:
    import io

    meta = {"encoder": probe.encoder, "image_size": probe.image_size, "class_names": probe.class_names}
    buf = io.BytesIO()
    np.savez(buf, weight=probe.weight, bias=probe.bias, meta=np.array(json.dumps(meta)))
    storage.write_bytes_atomic(path, buf.getvalue())


def load_probe(path: str) -> Probe:
    import io

    if not storage.exists(path):
        raise FileNotFoundError(f"probe not found: {path} (fit one with 'vismem probe SHARDS --out {path}')")
    try:
        with np.load(io.BytesIO(storage.read_bytes(path))) as z:
            meta = json.loads(str(z["meta"]))
            weight, bias = z["weight"].astype(np.float32), z["bias"].astype(np.float32)
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a probe saved by 'vismem probe': {exc}") from None
    return Probe(weight, bias, meta["encoder"], int(meta["image_size"]), meta["class_names"])


class ProbeTeacher(Teacher):
    """A linear probe applied to the embeddings of its own encoder (shared when it is the run's)."""

    def __init__(self, path: str):
        self.path = path
        probe = load_probe(path)
        self.name = f"probe:{os.path.basename(path)}@{probe.encoder}"
        self.num_classes = probe.weight.shape[0]
        self.probe = probe
        self._own = None

    def bind(self, encoder) -> None:
        if encoder.name == self.probe.encoder and encoder.image_size == self.probe.image_size:
            self._own = None
        else:
            from pipelines.encoders import load_encoder

            self._own = load_encoder(self.probe.encoder, self.probe.image_size, device=encoder.device)

    def classify(self, images, features):
        if self._own is not None:
            emb = self._own.embed(images)
        else:
            emb = F.normalize(features.float(), dim=1).cpu().numpy()
        return softmax_top1(torch.from_numpy(self.probe.logits(emb)))


def load_teacher(spec: str) -> Teacher:
    """A teacher from its ``--teacher`` spec (see the module docstring)."""
    if spec.startswith("probe:"):
        return ProbeTeacher(spec[len("probe:"):])
    if spec.startswith("efficientnet-lite"):
        from pipelines.encoders import EFFICIENTNET_SIZES

        if spec[len("efficientnet-lite"):] not in {str(v) for v in EFFICIENTNET_SIZES}:
            raise ValueError(f"unknown teacher {spec!r}: EfficientNet heads are efficientnet-lite0, -lite1, -lite2")
        return ImageNetHeadTeacher(spec)
    raise ValueError(f"unknown teacher {spec!r}; use efficientnet-lite0|1|2 (ImageNet head + --label-map) or "
                     "probe:PATH (a probe fit with 'vismem probe')")


def resolve_label_map(teacher: Teacher, label_map_path: str | None) -> LabelMap:
    """The label map for a teacher: the file when given, identity for a probe, an error for a head."""
    if label_map_path:
        return load_label_map(label_map_path, teacher.num_classes)
    if teacher.needs_label_map:
        raise ValueError(
            f"teacher {teacher.name} predicts {teacher.num_classes} ImageNet classes: pass --label-map FILE mapping "
            f"them to your classes (example: {os.path.join(LABEL_MAP_DIR, 'imagenet_to_fashion_mnist.json')})")
    return LabelMap.identity(teacher.num_classes)
