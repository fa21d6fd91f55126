"""Decoding: image bytes to square uint8 RGB pixels, or a :class:`BadImage` with the reason to quarantine.

Odd modes are converted (CMYK, palette, 16-bit and float greyscale, alpha composited onto white);
huge JPEGs are decoded at a reduced scale (``draft``) and anything still above ``max_pixels`` is
refused from its header, before a byte of pixels is decoded. Pure functions: tested without Ray.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# We check sizes ourselves (``max_pixels``) so the decision and its message are ours, not a warning.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 100_000_000


class BadImage(ValueError):
    """An input that cannot become an image; ``str(exc)`` is the quarantine reason."""


def decode_image(data, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB pixels of an encoded image, resized (bilinear).

    Args:
        data: the file's bytes; an exception instance stands for a read that already failed.
        size: the side of the output square (the encoder's input size).
        max_pixels: images with more pixels (after JPEG draft reduction) are refused.

    Raises:
        BadImage: empty, not an image, truncated/corrupt, too large or of an unconvertible mode.
    """
    if isinstance(data, BaseException):
        raise BadImage(f"unreadable: {data}")
    if data is None or len(data) == 0:
        raise BadImage("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image: no known image format") from None
    except Exception as exc:  # a header that PIL recognises but cannot parse
        raise BadImage(f"corrupt image header: {exc}") from None
    w, h = img.size
    if img.format == "JPEG":
        img.draft("RGB", (size, size))  # decode at 1/2..1/8 scale when that still covers `size`
    dw, dh = img.size
    if dw * dh > max_pixels:
        raise BadImage(f"image too large: {w}x{h} = {w * h} pixels (limit {max_pixels})")
    if w == 0 or h == 0:
        raise BadImage(f"empty image: {w}x{h}")
    try:
        img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError or ValueError for broken bodies
        raise BadImage(f"truncated or corrupt image: {exc}") from None
    rgb = to_rgb(img)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB version of ``img``: 16-bit and float greyscale are rescaled, alpha goes onto white."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        # 16-bit (I;16*, or I holding 16-bit PNG data) keeps its top byte; wider ints are clipped.
        arr = np.clip(arr, 0, 65535) >> 8
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if np.nanmax(arr, initial=0) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX
    except Exception as exc:
        raise BadImage(f"unsupported image mode {mode}: {exc}") from None


def pixels_of(payload, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A record payload to pixels: arrays (IDX rows) pass through, bytes are decoded."""
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim not in (2, 3):
            raise BadImage(f"pixel array must be uint8 (H, W) or (H, W, 3), got {payload.dtype} {payload.shape}")
        return payload
    return decode_image(payload, size, max_pixels)
