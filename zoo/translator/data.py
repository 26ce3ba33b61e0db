"""The edges2digits task: a digit's outline (input) and the digit (target), both
[N, 1, 32, 32] in [-1, 1] (ink +1, background -1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.data import load_digit_images, train_test_split

EDGE_THRESHOLD = 0.35  # Sobel magnitude of [0, 1] images: a one-to-two-pixel outline


def sketch(digits: torch.Tensor) -> torch.Tensor:
    """The edge map of [N, 1, H, W] digits in [-1, 1]: |Sobel| > threshold, as ink."""
    x = (digits + 1) / 2
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3) / 4
    gx = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kx)
    gy = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kx.transpose(2, 3))
    edges = (gx.pow(2) + gy.pow(2)).sqrt() > EDGE_THRESHOLD
    return edges.float() * 2 - 1


def edges2digits() -> dict:
    """{"train": (sketches, digits, labels), "test": (...)} on zoo.data's fixed split."""
    images, labels = load_digit_images()
    train, test = train_test_split(len(images))
    s = sketch(images)
    return {"train": (s[train], images[train], labels[train]), "test": (s[test], images[test], labels[test])}
