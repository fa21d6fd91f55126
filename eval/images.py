"""Images of a memory's items for people and models: where each item lives, and its picture as PNG/JPEG bytes."""
from __future__ import annotations

import io

import numpy as np

from memory import manifest as mf
from memory import uris
from memory.items import read_items


def item_locations(memory_path: str, version: int | None = None) -> dict:
    """``{item id: (shard entry, row, uri)}`` over every shard of a memory version."""
    out = {}
    for entry in mf.read_manifest(memory_path, version).shards:
        t = read_items(memory_path, entry, columns=["id", "uri"])
        for row, (item, uri) in enumerate(zip(t.column("id").to_pylist(), t.column("uri").to_pylist())):
            out[item] = (entry, row, uri)
    return out


def item_uris(memory_path: str, version: int | None = None) -> dict:
    """``{item id: uri}`` over every shard of a memory version."""
    return {item: loc[2] for item, loc in item_locations(memory_path, version).items()}


def image_bytes(uri: str) -> bytes | None:
    """PNG/JPEG bytes of the image an item's ``uri`` names; None when there is none or it cannot be read.

    :func:`memory.uris.resolve` (which knows every source kind) gives encoded bytes, returned as
    they are, or an IDX row's pixels, encoded as PNG.
    """
    if not uri:
        return None
    try:
        image = uris.resolve(uri)
    except (OSError, ValueError):  # a missing file or row: the page shows "no image", the model gets none
        return None
    return png(image) if isinstance(image, np.ndarray) else image


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 pixel array (H, W) or (H, W, C)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
