"""A small CNN that classifies the 32x32 digits; the judge of generated images."""

from __future__ import annotations

import torch
import torch.nn as nn


class DigitClassifier(nn.Module):
    """[N, 1, 32, 32] in [-1, 1] -> logits [N, 10].

    Three conv + max-pool stages (32 -> 16 -> 8 -> 4) and a two-layer head, about
    0.2M parameters: plenty for 8x8-resolution digits, small enough to train in
    seconds on a CPU and to run next to a generator in tests and benchmarks.
    BatchNorm makes it robust to the slightly different contrast of generated
    images; dropout in the head curbs overfitting on ~1,400 training images.
    """

    def __init__(self, num_classes: int = 10, image_channels: int = 1, base_channels: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.image_channels = image_channels
        c = base_channels

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]

        self.features = nn.Sequential(*stage(image_channels, c), *stage(c, 2 * c), *stage(2 * c, 2 * c))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * c * 4 * 4, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
