"""The encoder box: embeds base64 image files uploaded to a server started with ``--encoder``."""
from __future__ import annotations

import base64
import binascii
import threading

import numpy as np

from deploy.serving.errors import error
from memory.encoder_spec import EncoderSpec


class EncoderBox:
    """A server's encoder (loaded at start by :meth:`load`, so its full description can be checked
    against the memory's before the first request), decoding base64 image files."""

    def __init__(self, name: str, image_size: int | None):
        from pipelines.encoders import encoder_image_size

        self.name = name
        self.size = encoder_image_size(name, image_size)  # an unknown name fails at start-up
        self.image_size = image_size
        self._model = None
        self._lock = threading.Lock()

    def load(self) -> "EncoderBox":
        from pipelines.encoders import load_encoder

        with self._lock:
            if self._model is None:
                self._model = load_encoder(self.name, self.image_size)
        return self

    @property
    def spec(self) -> EncoderSpec:
        """The encoder's description: the loaded model's own (name, version, image size, preprocessing)."""
        model = self._model
        return model.spec if model is not None else EncoderSpec(self.name, image_size=self.size)

    @property
    def dim(self) -> int:
        return self.load()._model.dim

    def embed(self, images: list[str]) -> np.ndarray:
        """One embedding row per image; undecodable input is a 422 naming the image."""
        from pipelines.images import BadImage, decode_image

        pixels = []
        for i, text in enumerate(images):
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise error(422, f"images[{i}] is not valid base64") from None
            try:
                pixels.append(decode_image(data, self.size, max_pixels=50_000_000))
            except BadImage as exc:
                raise error(422, f"images[{i}]: {exc}") from None
        model = self.load()._model
        with self._lock:  # one forward pass at a time: torch already uses every core
            return model.embed(np.stack(pixels))
