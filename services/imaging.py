"""Pixels in and out: model range -> uint8, and uint8 -> PNG/JPEG/WebP bytes.

Every encoded image says in its metadata that it was generated, by which model and
with which seed: PNG text chunks, and EXIF (Software, ImageDescription) for JPEG/WebP.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
from PIL import Image, PngImagePlugin

FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SOFTWARE = "genserve"

_EXIF_SOFTWARE = 0x0131
_EXIF_IMAGE_DESCRIPTION = 0x010E


def to_uint8(images: np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """[N, C, H, W] floats in [low, high] -> [N, H, W, C] uint8, rounded, clipped."""
    scaled = (images.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def encode_image(pixels: np.ndarray, fmt: str, metadata: Mapping[str, object]) -> bytes:
    """Encodes one [H, W, C] uint8 image (C = 1 or 3). Deterministic for equal input."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}")
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    description = json.dumps({"generated": True, **metadata}, sort_keys=True, default=str)
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", SOFTWARE)
        info.add_text("Description", description)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif[_EXIF_SOFTWARE] = SOFTWARE
        exif[_EXIF_IMAGE_DESCRIPTION] = description
        options = {"quality": 95} if fmt == "jpeg" else {"lossless": True}
        image.save(buffer, format=fmt.upper(), exif=exif, **options)
    return buffer.getvalue()


# What clients may send. Pillow's other decoders (BMP, TIFF, ICO, GIF, ...) stay unreachable:
# each is more parser exposed to hostile bytes, for formats the API never promised.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class NotAnAcceptedImage(ValueError):
    allowed: ClassVar[list[str]] = ["png", "jpeg", "webp"]


def open_image(data: bytes, field: str) -> Image.Image:
    """A client's image, opened (its header read, no pixel decoded): PNG, JPEG or WebP, a
    single frame. Raises NotAnAcceptedImage naming `field` and the accepted formats, or
    Pillow's DecompressionBombError for a header past Pillow's own pixel bound."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise
    except Exception as exc:  # PIL raises many types for bad data
        raise NotAnAcceptedImage(f"{field} is not a PNG, JPEG or WebP image, the formats accepted "
                                 f"({type(exc).__name__})") from None
    if getattr(image, "is_animated", False) and image.format != "MPO":  # MPO: a camera's JPEG, frame 0 is the photo
        frames = getattr(image, "n_frames", "several")  # the multi-frame formats' attribute, not ImageFile's
        raise NotAnAcceptedImage(f"{field} is animated ({frames} frames): send a single image")
    return image


class ImageTooLarge(ValueError):
    def __init__(self, field: str, width: int, height: int, max_side: int):
        super().__init__(f"{field} is {width}x{height}; sides may be at most {max_side} pixels")
        self.limit = max_side


def decode_image(data: bytes, channels: int, field: str, max_side: int) -> np.ndarray:
    """Image bytes -> [C, H, W] float32 in [-1, 1] with the model's channel count.

    The size in the header is checked before any pixel is decoded, so a small file that
    claims huge dimensions costs nothing (ImageTooLarge). Raises ValueError naming
    `field` when the bytes are not a PNG, JPEG or WebP image that decodes (NotAnAcceptedImage
    when not one of those formats). CPU-bound: call it off the event loop.
    """
    try:
        image = open_image(data, field)
    except Image.DecompressionBombError:
        raise ValueError(f"{field} claims more pixels than Pillow decodes") from None
    if max(image.size) > max_side:
        raise ImageTooLarge(field, *image.size, max_side)
    try:
        image.load()
    except Exception as exc:
        raise ValueError(f"{field} is not a decodable PNG/JPEG/WebP image ({type(exc).__name__})") from None
    image = image.convert("L" if channels == 1 else "RGB")
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


ANIMATIONS = {"gif": "image/gif", "webp_animated": "image/webp"}


def encode_animation(frames: np.ndarray, fmt: str, metadata: Mapping[str, object], frame_ms: int = 80) -> bytes:
    """[N, H, W, C] uint8 frames -> one animated GIF or WebP (looping), saying in its
    metadata (GIF comment, WebP EXIF) that it was generated, and how."""
    if fmt not in ANIMATIONS:
        raise ValueError(f"unknown animation format {fmt!r}")
    images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    description = json.dumps({"generated": True, **metadata}, sort_keys=True, default=str)
    buffer = io.BytesIO()
    if fmt == "gif":
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0,
                       comment=description.encode())
    else:
        exif = Image.Exif()
        exif[_EXIF_SOFTWARE] = SOFTWARE
        exif[_EXIF_IMAGE_DESCRIPTION] = description
        images[0].save(buffer, format="WEBP", save_all=True, append_images=images[1:], duration=frame_ms, loop=0,
                       lossless=True, exif=exif)
    return buffer.getvalue()
