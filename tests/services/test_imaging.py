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
