"""DCGAN generator and spectral-norm projection discriminator for the 32x32 digits.

The generator is what gets served, so it uses only ops that trace to plain ONNX
(Embedding, Linear, Resize, Conv2d, BatchNorm2d, ReLU, Tanh, Concat, Reshape)
and no Python branches on tensor values: a dynamic batch axis survives
`torch.onnx.export(..., dynamo=False)`. The discriminator only exists at training
time and is free to use spectral-norm parametrizations.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


def _up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Doubles the resolution: nearest upsampling + 3x3 conv (ONNX Resize + Conv).

    Preferred over a stride-2 ConvTranspose2d, whose uneven kernel overlap left a
    grainy checkerboard on the smooth upsampled digits.
    """
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DCGANGenerator(nn.Module):
    """z [N, latent_dim] (+ class label [N]) -> image [N, C, 32, 32] in [-1, 1].

    Layout: Linear to a 4x4 map with 4*base channels, then three upsample + conv
    blocks 4 -> 8 -> 16 -> 32 halving the channels, and a 3x3 conv + tanh. When
    `num_classes > 0` a learned label embedding (same width as z) is concatenated
    to z: the simplest conditioning that exports to ONNX as Gather + Concat, and
    enough for ten digit classes (conditional BatchNorm would be stronger but adds
    per-class affine parameters and a less obvious graph).
    """

    def __init__(
        self,
        latent_dim: int = 64,
        num_classes: int = 0,
        image_channels: int = 1,
        image_size: int = 32,
        base_channels: int = 32,
    ) -> None:
        super().__init__()
        if image_size != 32:
            raise ValueError("DCGANGenerator is laid out for 32x32 images (4 -> 8 -> 16 -> 32)")
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.image_channels = image_channels
        self.image_size = image_size
        self.base_channels = base_channels
        c = base_channels
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes > 0 else None
        in_dim = latent_dim * (2 if num_classes > 0 else 1)
        self.project = nn.Linear(in_dim, 4 * c * 4 * 4, bias=False)
        self.project_norm = nn.BatchNorm2d(4 * c)
        self.blocks = nn.Sequential(_up_block(4 * c, 2 * c), _up_block(2 * c, c), _up_block(c, c // 2))
        self.to_image = nn.Conv2d(c // 2, image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, class_label: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if class_label is None:
                raise ValueError("this generator is class-conditional: pass class_label")
            z = torch.cat([z, self.embed(class_label)], dim=1)
        h = self.project(z).view(-1, 4 * self.base_channels, 4, 4)
        h = F.relu(self.project_norm(h))
        return torch.tanh(self.to_image(self.blocks(h)))


class Discriminator(nn.Module):
    """Spectral-norm CNN critic; a projection discriminator when `num_classes > 0`.

    Spectral norm bounds each layer's Lipschitz constant, which together with the
    hinge loss keeps training stable on a data set as small as 1,797 digits.
    Projection (Miyato & Koyama 2018): D(x, y) = psi(phi(x)) + <embed(y), phi(x)>,
    which conditions far more sharply than concatenating labels to the input.
    phi(x) is the flattened 4x4 map, not a global sum: where strokes are matters
    for digits, and a shallow network has no other way to see the whole image.
    A minibatch-stddev channel (Karras et al. 2018) lets D see how varied a batch
    is. (With global sum pooling and no such channel, the conditional G drew
    nearly one template per digit: within-class pixel spread 0.17x the data's.)
    """

    def __init__(self, num_classes: int = 0, image_channels: int = 1, base_channels: int = 32) -> None:
        super().__init__()
        c = base_channels

        def down(c_in: int, c_out: int) -> list[nn.Module]:
            return [spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.1)]

        # Strided convs 32 -> 16 -> 8 -> 4 (DCGAN-style: cheap on a CPU).
        self.features = nn.Sequential(*down(image_channels, c), *down(c, 2 * c), *down(2 * c, 4 * c))
        dim = (4 * c + 1) * 4 * 4
        self.linear = spectral_norm(nn.Linear(dim, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, dim)) if num_classes > 0 else None

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """Features [N, (4c + 1) * 16]: the 4x4 map plus the batch's mean feature stddev."""
        h = self.features(x)
        std = h.std(dim=0).mean().expand(h.shape[0], 1, *h.shape[2:])
        return torch.cat([h, std], dim=1).flatten(1)

    def forward(self, x: torch.Tensor, class_label: torch.Tensor | None = None) -> torch.Tensor:
        phi = self.phi(x)
        out = self.linear(phi).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(class_label) * phi).sum(dim=1)
        return out


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]: no gradient once a margin of 1 is met."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(G(z))]."""
    return -fake_logits.mean()
