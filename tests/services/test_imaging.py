import io
import json

import numpy as np
import pytest
from PIL import Image

from services.imaging import encode_image, to_uint8


def test_to_uint8_maps_range_rounds_and_clips():
    x = np.array([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0], np.float32).reshape(1, 1, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 1)
    assert out.ravel().tolist() == [0, 0, 128, 255, 255, 255]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encoded_images_decode_and_say_they_were_generated(fmt):
    pixels = (np.arange(32 * 32, dtype=np.uint32) % 251).astype(np.uint8).reshape(32, 32, 1)
    data = encode_image(pixels, fmt, {"model": "m", "seed": 5})
    image = Image.open(io.BytesIO(data))
    assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    assert image.size == (32, 32)
    if fmt == "png":
        assert image.text["Software"] == "genserve"
        description = image.text["Description"]
        np.testing.assert_array_equal(np.asarray(image), pixels[..., 0])  # lossless
    else:
        exif = image.getexif()
        assert exif[0x0131] == "genserve"
        description = exif[0x010E]
    assert json.loads(description) == {"generated": True, "model": "m", "seed": 5}
    assert encode_image(pixels, fmt, {"model": "m", "seed": 5}) == data  # deterministic


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError):
        encode_image(np.zeros((2, 2, 1), np.uint8), "gif", {})


def _saved(fmt: str, **options) -> bytes:
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (10, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, **options)
    return buffer.getvalue()


REFUSED = {"bmp": _saved("BMP"), "tiff": _saved("TIFF"), "ico": _saved("ICO"), "gif": _saved("GIF"),
           "apng": _saved("PNG", save_all=True, append_images=[Image.new("RGB", (16, 16))]),
           "animated webp": _saved("WEBP", save_all=True, append_images=[Image.new("RGB", (16, 16))])}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_only_single_png_jpeg_and_webp_images_are_decoded(kind):
    """Pillow's other decoders stay unreachable; the 422 names the accepted formats."""
    import base64
    from types import SimpleNamespace

    from services.diffusion_requests import decode_field
    from services.errors import InvalidRequest
    from services.imaging import decode_image
    from services.routers.image_to_image import decode_upload

    data = REFUSED[kind]
    with pytest.raises(InvalidRequest) as refused:
        decode_field(base64.b64encode(data).decode(), 3, "image", 64)
    assert refused.value.field == "image" and refused.value.allowed == ["png", "jpeg", "webp"]
    assert "PNG, JPEG or WebP" in refused.value.message or "animated" in refused.value.message
    sr = SimpleNamespace(scale=2, input_channels=3, input_range=(0.0, 1.0))
    with pytest.raises(InvalidRequest) as refused:
        decode_upload(base64.b64encode(data).decode(), "image", sr, 10**6)
    assert refused.value.allowed == ["png", "jpeg", "webp"]
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert decode_image(_saved(fmt), 3, "image", 64).shape == (3, 16, 16)
