"""The encoder description every stage shares: which model made the embeddings, and how it saw the images.

Stored twice: in a memory's manifest (``encoder``: ``{"name", "version", "image_size", "preprocessing"}``)
and in each embedding shard's schema metadata (``encoder``, ``encoder_version``, ``image_size``,
``preprocessing``, all strings). Older memories record only some keys; a key not recorded is
unknown (``None``) and is not compared.
"""
from __future__ import annotations

import dataclasses

_FIELDS = ("name", "version", "image_size", "preprocessing")
_METADATA_KEYS = {"name": "encoder", "version": "encoder_version", "image_size": "image_size",
                  "preprocessing": "preprocessing"}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """``name`` (``efficientnet-lite0``, ``dinov2:PATH``), ``version`` (of its weights), ``image_size``
    (input pixels per side) and ``preprocessing`` (how pixels become model input, e.g.
    ``rgb (x - 127) / 128``)."""

    name: str
    version: str | None = None
    image_size: int | None = None
    preprocessing: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"an encoder needs a name, got {self.name!r}")
        if self.image_size is not None and (isinstance(self.image_size, bool) or int(self.image_size) < 1):
            raise ValueError(f"encoder image size must be a positive integer, got {self.image_size!r}")
        if self.image_size is not None:
            object.__setattr__(self, "image_size", int(self.image_size))

    @classmethod
    def from_manifest(cls, value: dict | None) -> "EncoderSpec | None":
        """From a manifest's ``encoder`` entry; None when it names no encoder (``{}``)."""
        if not value or not value.get("name"):
            return None
        return cls(**{f: value.get(f) for f in _FIELDS})

    def to_manifest(self) -> dict:
        """The manifest's ``encoder`` entry (keys of unknown values left out)."""
        return {f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not None}

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> "EncoderSpec | None":
        """From an embedding shard's schema metadata (decoded to ``str``); None without an encoder."""
        meta = metadata or {}
        if not meta.get("encoder"):
            return None
        values = {f: meta.get(key) or None for f, key in _METADATA_KEYS.items()}
        return cls(**{**values, "image_size": int(values["image_size"]) if values["image_size"] else None})

    def to_metadata(self) -> dict:
        """Schema-metadata entries (strings) for an embedding shard."""
        return {key: str(getattr(self, f)) for f, key in _METADATA_KEYS.items() if getattr(self, f) is not None}

    def describe(self) -> str:
        parts = [f"{f}={getattr(self, f)}" for f in _FIELDS[1:] if getattr(self, f) is not None]
        return f"{self.name} ({', '.join(parts)})" if parts else self.name

    def check_compatible(self, other: "EncoderSpec") -> None:
        """Raise ValueError, naming both sides, unless ``other`` embeds images the same way.

        Fields unknown (``None``) on either side are not compared.
        """
        differ = [f for f in _FIELDS if getattr(self, f) is not None and getattr(other, f) is not None
                  and getattr(self, f) != getattr(other, f)]
        if differ:
            raise ValueError(f"encoders differ in {', '.join(differ)}: {self.describe()} vs {other.describe()}; "
                             "one memory holds one encoder's embeddings")
