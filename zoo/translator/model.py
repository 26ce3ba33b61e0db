"""Pix2Pix's two networks, sized for 32x32 digits (Isola et al. 2017, section 3.2):
a U-Net generator (encoder-decoder with skip connections between mirrored layers;
Conv-BatchNorm-LeakyReLU down, ConvTranspose-BatchNorm-ReLU up, dropout as the noise
source in the innermost up-layers, tanh out) and a PatchGAN discriminator that classifies
overlapping patches of the (input, output) pair as real or fake."""

from __future__ import annotations

import torch
import torch.nn as nn


class UnetGenerator(nn.Module):
    """[N, in_channels, H, W] in [-1, 1] -> [N, out_channels, H, W] in [-1, 1]; H and W
    multiples of 2 ** depth."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 32, depth: int = 3):
        super().__init__()
        self.depth = depth
        widths = [ngf * min(2**i, 4) for i in range(depth)]
        self.down = nn.ModuleList()
        c = in_channels
        for i, w in enumerate(widths):
            layers = [nn.Conv2d(c, w, 4, 2, 1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            self.down.append(nn.Sequential(*layers))
            c = w
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):
            skip = widths[i - 1] if i > 0 else 0
            w_out = skip if i > 0 else ngf
            layers = [nn.ConvTranspose2d(c, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]
            if i == depth - 1:
                layers.append(nn.Dropout(0.5))
            self.up.append(nn.Sequential(*layers))
            c = w_out * 2 if i > 0 else w_out
        self.out = nn.Sequential(nn.Conv2d(c, out_channels, 3, 1, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        skips.pop()  # the innermost features are x itself
        for layer in self.up:
            x = layer(x)
            if skips:
                x = torch.cat([x, skips.pop()], 1)
        return self.out(x)


class PatchDiscriminator(nn.Module):
    """(input, output) pair [N, in+out, 32, 32] -> [N, 1, 4, 4] logits, one per patch."""

    def __init__(self, in_channels: int = 2, ndf: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 3, 1, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, 1, 3, 1, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a, b], 1))
