"""The encoder description every stage shares: which model made the embeddings, and how it saw the images.

Stored twice: in a memory's manifest (``encoder``: ``{"name", "version", "image_size", "preprocessing"}``)
and in each embedding shard's schema metadata (``encoder``, ``encoder_version``, ``image_size``,
``preprocessing``, all strings). Older memories record only some keys; a key not recorded is
unknown (``None``) and is not compared.

Checked at every door: :func:`agreed` makes one description of a set of shards (refusing two that
differ), :func:`check_against_memory` compares it with a memory's (build, add, query, eval, serve).
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
        size = values["image_size"]
        if size is not None and not str(size).strip().isdigit():
            raise ValueError(f"encoder metadata: image_size must be a positive integer, got {size!r}")
        return cls(**{**values, "image_size": int(size) if size else None})

    def to_metadata(self) -> dict:
        """Schema-metadata entries (strings) for an embedding shard."""
        return {key: str(getattr(self, f)) for f, key in _METADATA_KEYS.items() if getattr(self, f) is not None}

    def describe(self) -> str:
        parts = [f"{f}={getattr(self, f)}" for f in _FIELDS[1:] if getattr(self, f) is not None]
        return f"{self.name} ({', '.join(parts)})" if parts else self.name

    def differences(self, other: "EncoderSpec") -> list[str]:
        """The fields both sides know and disagree on (``[]``: the same encoder as far as is known)."""
        return [f for f in _FIELDS if getattr(self, f) is not None and getattr(other, f) is not None
                and getattr(self, f) != getattr(other, f)]

    def check_compatible(self, other: "EncoderSpec") -> None:
        """Raise ValueError, naming both sides, unless ``other`` embeds images the same way.

        Fields unknown (``None``) on either side are not compared.
        """
        differ = self.differences(other)
        if differ:
            raise ValueError(f"encoders differ in {', '.join(differ)}: {self.describe()} vs {other.describe()}; "
                             "one memory holds one encoder's embeddings")


def agreed(specs) -> "EncoderSpec | None":
    """The one encoder a set of embedding shards names, from ``(where, EncoderSpec or None)`` pairs.

    Every field any shard records is kept (shards that record less are not wrong, only less
    precise); two shards that record different values of a field are refused, both named (the
    more completely described first).
    """
    known: dict = {}  # field -> (value, where, spec)
    for where, spec in specs:
        if spec is None:
            continue
        for f in _FIELDS:
            value = getattr(spec, f)
            if value is None:
                continue
            if f in known and known[f][0] != value:
                (a, wa), (b, wb) = sorted([(known[f][2], known[f][1]), (spec, where)], key=lambda p: -_known(p[0]))
                raise ValueError(f"the embedding shards come from different encoders: encoders differ in "
                                 f"{', '.join(a.differences(b))}: {a.describe()} vs {b.describe()} ({wa} vs {wb})")
            known.setdefault(f, (value, where, spec))
    return EncoderSpec(**{f: v[0] for f, v in known.items()}) if known else None


def _known(spec: EncoderSpec) -> int:
    return sum(getattr(spec, f) is not None for f in _FIELDS)


def check_against_memory(memory_encoder: dict | None, inputs: "EncoderSpec | None", *, memory: str,
                         inputs_what: str) -> None:
    """Refuse embeddings made otherwise than a memory's items (name, version, image size, preprocessing).

    ``memory_encoder`` is the manifest's ``encoder`` entry; either side unknown passes, as does a
    field only one side records. A query embedded at another image size has the memory's dimension
    but not its geometry, so its neighbours would be meaningless: it is refused, both sides named.
    """
    spec = EncoderSpec.from_manifest(memory_encoder)
    if spec is None or inputs is None:
        return
    differ = spec.differences(inputs)
    if differ:
        raise ValueError(f"{inputs_what} do not match memory {memory} (the memory's encoder first, theirs "
                         f"second): encoders differ in {', '.join(differ)}: {spec.describe()} vs "
                         f"{inputs.describe()}; embed them with the memory's encoder")
