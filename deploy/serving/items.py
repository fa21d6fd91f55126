"""The item endpoints: one stored item (label, provenance, embedding) and its image, by id.

``GET /v1/items/{id}`` answers a live item of the served version; ``GET /v1/items/{id}/image`` its
image, found from its provenance ``uri`` by ``memory.uris.resolve`` (every source kind: an IDX row,
an image file, a WebDataset sample, a Parquet row), as the browser-viewable bytes it was stored as or
re-encoded as PNG. Ids may hold ``/`` (``fmnist/train/123``); a client URL-encodes them. A removed
item is not found: unlearning removes its image from the API too. Only bytes that decode as an
image are ever served, whatever file an item's ``uri`` names.
"""
from __future__ import annotations

import io
import threading
import weakref

import numpy as np
from fastapi import APIRouter, Query
from fastapi.responses import Response

from deploy.serving.dependencies import ServingDep
from deploy.serving.errors import COMMON, ITEM, error
from deploy.serving.models import StoredItem
from memory import uris
from memory.items import read_items
from memory.memory import Memory
from memory.shard import read_vectors

router = APIRouter(prefix="/v1/items", responses={**COMMON, **ITEM})
# What browsers show as they are; any other image (TIFF, PPM, an IDX row's pixels) is re-encoded as PNG.
WEB_IMAGES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF87a": "image/gif",
              b"GIF89a": "image/gif"}
_IMAGE_TYPES = {t: {} for t in ("image/png", "image/jpeg", "image/gif", "image/webp")}
_PROVENANCE = ("label_source", "confidence", "source", "uri")


class ItemIndex:
    """Where each item of one opened version is: its ids sorted once (a binary search per lookup) and
    each shard's provenance columns, read at the first lookup in that shard.

    Holds what it needs of the version, never the :class:`Memory` itself: the version's entry in
    ``_indices`` (weakly keyed) goes when the version does.
    """

    def __init__(self, mem: Memory):
        ids = mem.columns.ids
        if ids is None and mem.shards:  # shards hosted elsewhere (Ray): a server loads its own
            raise RuntimeError("item lookup needs a memory whose shards are loaded in this process")
        ids = np.asarray([] if ids is None else ids, dtype=object)
        self.root, self.version = mem.root, mem.version
        self.entries = [s.entry for s in mem.shards]
        self.removed = [s.removed for s in mem.shards]
        self.offsets = mem.columns.offsets
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[self.order]
        self._provenance: dict[int, dict] = {}
        self._lock = threading.Lock()

    def find(self, item_id: str) -> tuple[int, int] | None:
        """``(shard index, row)`` of the live item ``item_id``; None when there is none (or it was removed)."""
        at = int(np.searchsorted(self.sorted_ids, item_id))
        if at >= len(self.sorted_ids) or self.sorted_ids[at] != item_id:
            return None
        key = int(self.order[at])
        shard = int(np.searchsorted(self.offsets, key, side="right") - 1)
        row = key - int(self.offsets[shard])
        if self.removed[shard][row]:
            return None
        return shard, row

    def provenance(self, shard: int, row: int) -> dict:
        with self._lock:
            if shard not in self._provenance:
                t = read_items(self.root, self.entries[shard], columns=_PROVENANCE)
                self._provenance[shard] = {c: t.column(c).to_pylist() for c in _PROVENANCE}
        cols = self._provenance[shard]
        return {c: cols[c][row] for c in _PROVENANCE}


_indices: "weakref.WeakKeyDictionary[Memory, ItemIndex]" = weakref.WeakKeyDictionary()
_indices_lock = threading.Lock()


def item_index(mem: Memory) -> ItemIndex:
    """The version's :class:`ItemIndex`, built at its first use and dropped with the version."""
    with _indices_lock:
        index = _indices.get(mem)
        if index is None:
            index = _indices[mem] = ItemIndex(mem)
        return index


def locate(mem: Memory, item_id: str) -> tuple[ItemIndex, int, int]:
    """The index, shard and row of a live item, or a 404 naming the id and the version."""
    index = item_index(mem)
    where = index.find(item_id)
    if where is None:
        raise error(404, f"no live item {item_id!r} in version {mem.version} of this memory (never added, "
                         "or removed)")
    return index, *where


@router.get("/{item_id:path}/image", response_class=Response, summary="the image of a stored item",
            responses={200: {"content": _IMAGE_TYPES, "description": "the item's image (PNG, JPEG, GIF or WebP)"}})
def item_image(item_id: str, ctx: ServingDep,
               size: int | None = Query(None, ge=16, le=1024, description="shrink to fit a square of this many "
                                        "pixels per side (a thumbnail, PNG); default: the stored image")):
    with ctx.served.use() as mem:
        index, shard, row = locate(mem, item_id)
        uri = index.provenance(shard, row)["uri"]
    if not uri:
        raise error(404, f"item {item_id!r} has no image: its provenance names no uri")
    data, media = image_response(item_id, uri, size)
    return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})


@router.get("/{item_id:path}", response_model=StoredItem, summary="a stored item: label, provenance, embedding")
def item(item_id: str, ctx: ServingDep):
    with ctx.served.use() as mem:
        index, shard, row = locate(mem, item_id)
        key = int(mem.columns.offsets[shard]) + row
        label = int(mem.columns.labels[key])
        names = mem.class_names
        prov = index.provenance(shard, row)
        vector = read_vectors(mem.root, mem.shards[shard].entry, [row])[0]
        return {"id": item_id, "version": mem.version, "label": label,
                "label_name": names[label] if 0 <= label < len(names) else None,
                "weight": float(mem.columns.weights[key]), "label_source": prov["label_source"],
                "confidence": prov["confidence"], "source": prov["source"], "uri": prov["uri"],
                "has_image": bool(prov["uri"]), "embedding": vector.astype(float).tolist()}


def image_response(item_id: str, uri: str, size: int | None) -> tuple[bytes, str]:
    """``(bytes, media type)`` of the image ``uri`` names, shrunk to ``size`` if given; a 404 says why not."""
    try:
        image = uris.resolve(uri)
    except (OSError, ValueError) as exc:
        raise error(404, f"the image of item {item_id!r} cannot be read from {uri}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if isinstance(image, bytes):
        media = next((t for magic, t in WEB_IMAGES.items() if image.startswith(magic)), None)
        if media is None and image[:4] == b"RIFF" and image[8:12] == b"WEBP":
            media = "image/webp"
        if media is not None and size is None:
            return image, media
    try:
        return to_png(image, size), "image/png"
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for bytes that are not an image
        raise error(404, f"the file of item {item_id!r} at {uri} is not an image that can be shown "
                         f"({type(exc).__name__}: {exc})") from None


def to_png(image: bytes | np.ndarray, size: int | None = None) -> bytes:
    """PNG bytes of encoded image bytes or a uint8 pixel array, shrunk (never enlarged) to fit ``size``."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    else:
        img = Image.open(io.BytesIO(image))
        img.load()
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    if size is not None:
        img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
