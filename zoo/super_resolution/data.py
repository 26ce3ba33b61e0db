"""The photos that ship inside scikit-image (`skimage.data`) and scikit-learn
(`load_sample_images`), split once into training and held-out photos, and the bicubic
x4 degradation the demo learns to invert. Nothing is downloaded: only the images bundled
in the wheels are read (skimage.data's other images are fetched on first use; not these).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Photos of the real world (the synthetic charts, logos and phantoms are left out).
# Held out from training, measured by zoo.super_resolution.evaluate:
HELD_OUT = ("astronaut", "chelsea", "flower")
TRAIN_RGB = ("coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle", "retina", "china")
TRAIN_GRAY = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "cell")


def load_photo(name: str) -> np.ndarray:
    """[H, W, 3] uint8 (grey photos repeated on three channels)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            image = image[0]  # (left, right, disparity): the left view
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def crop_to_multiple(image: np.ndarray, scale: int) -> np.ndarray:
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def bicubic_down(image: np.ndarray, scale: int) -> np.ndarray:
    """The degradation: PIL's bicubic (antialiased) x1/scale of an [H, W, 3] uint8 image."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w // scale, h // scale), Image.BICUBIC))


def bicubic_up(image: np.ndarray, scale: int) -> np.ndarray:
    """The baseline the model must beat: PIL's bicubic x scale."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * scale, h * scale), Image.BICUBIC))
