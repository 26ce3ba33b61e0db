"""The demo data set: scikit-learn's 1,797 handwritten digits, upsampled to 32x32.

The 8x8 digits ship inside scikit-learn, so training needs no download. They are
upsampled bilinearly to 32x32 (a size convolutional generators and latent diffusion
models handle naturally) and scaled to [-1, 1], the range of a tanh generator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

IMAGE_SIZE = 32
NUM_CLASSES = 10


def load_digit_images(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (images [N, 1, S, S] float32 in [-1, 1], labels [N] int64)."""
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0) * 2.0 - 1.0
    y = torch.from_numpy(digits.target.astype(np.int64))
    return x, y


def train_test_split(
    n: int, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded split so every script holds out the same digits."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return order[n_test:], order[:n_test]
