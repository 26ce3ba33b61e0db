"""The committed StyleGAN demo checkpoint: NVIDIA's interface, small, draws the asked digit, mixes styles sensibly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from zoo.stylegan.model import DEFAULT_CHECKPOINT, StyleGANGenerator, load_stylegan


@pytest.fixture(scope="module")
def g() -> StyleGANGenerator:
    return load_stylegan()


def test_checkpoint_is_small_and_describes_itself():
    assert DEFAULT_CHECKPOINT.with_suffix(".safetensors").stat().st_size < 5 * 2**20
    meta = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    assert meta["architecture"] == "StyleGANGenerator"
    assert meta["training"]["metrics"]["overall"] >= 0.9


def test_nvidia_attribute_names(g):
    assert (g.z_dim, g.c_dim, g.w_dim, g.num_ws, g.img_resolution, g.img_channels) == (64, 10, 128, 8, 32, 1)
    assert g.mapping.w_avg.shape == (g.w_dim,) and g.mapping.w_avg.abs().sum() > 0  # trained moving average
    z = torch.randn(4, g.z_dim, generator=torch.Generator().manual_seed(0))
    c = F.one_hot(torch.arange(4), 10).float()
    with torch.no_grad():
        ws = g.mapping(z, c, truncation_psi=1, truncation_cutoff=None)
        assert ws.shape == (4, g.num_ws, g.w_dim) and torch.equal(ws[:, :1].expand_as(ws), ws)
        img = g.synthesis(ws)
        assert img.shape == (4, 1, 32, 32) and img.min() >= -1 and img.max() <= 1
        assert torch.equal(g(z, c), img)  # forward = synthesis(mapping(z, c)), deterministic
        # truncation as NVIDIA's: w_avg + psi * (w - w_avg) on the first truncation_cutoff layers
        half = g.mapping(z, c, truncation_psi=0.5, truncation_cutoff=3)
        torch.testing.assert_close(half[:, :3], g.mapping.w_avg.lerp(ws[:, :3], 0.5))
        torch.testing.assert_close(half[:, 3:], ws[:, 3:])


def test_w_avg_moves_only_when_asked():
    g = StyleGANGenerator(z_dim=8, c_dim=2, w_dim=8, img_resolution=8, channels={4: 8, 8: 8})
    z, c = torch.randn(5, 8), F.one_hot(torch.arange(5) % 2, 2).float()
    g.mapping(z, c)
    assert g.mapping.w_avg.abs().sum() == 0
    w = g.mapping(z, c, update_emas=True)[:, 0]
    torch.testing.assert_close(g.mapping.w_avg, 0.005 * w.mean(0).detach())


@pytest.mark.slow
def test_classifier_recognises_the_asked_digit(g):
    from zoo.stylegan.evaluate import class_accuracy, load_classifier

    stats = class_accuracy(g, load_classifier())
    assert stats["overall"] >= 0.9, stats
    assert min(stats["per_class"]) >= 0.7, stats
    assert stats["diversity_ratio"] >= 0.4, stats  # not one template per digit (was 0.09 before the init fix)


@pytest.mark.slow
def test_coarse_styles_keep_the_class(g):
    """ws[:crossover] of (seed A, class a) + ws[crossover:] of (seed B, class b): class a past the coarse layers."""
    from zoo.stylegan.evaluate import load_classifier, mixing_curve

    curve = mixing_curve(g, load_classifier(), pairs=300)
    assert curve[0] <= 0.2 and curve[-1] >= 0.9, curve  # all of B's styles draw b; all of A's draw a
    assert curve[5] >= 0.8, curve  # 4x4, 8x8 and 16x16 (first conv) styles from A: still digit a
