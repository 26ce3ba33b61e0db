"""The committed zoo checkpoints load, judge well, are deterministic, export, and training still runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zoo.checkpoint import load_checkpoint
from zoo.evaluate import class_accuracy, heldout_accuracy, sample_statistics
from zoo.train_gan import main as train_gan

GENERATORS = ("dcgan_digits", "cgan_digits")


def _inputs(g: torch.nn.Module, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    z = torch.randn(n, g.latent_dim, generator=torch.Generator().manual_seed(seed))
    return (z, torch.arange(n) % g.num_classes) if g.num_classes else (z,)


def test_classifier_heldout_accuracy():
    assert heldout_accuracy(load_checkpoint("digit_classifier")) >= 0.95


def test_cgan_draws_the_requested_digit_with_variety():
    stats = class_accuracy(load_checkpoint("cgan_digits"), load_checkpoint("digit_classifier"))
    assert stats["overall"] >= 0.85, stats
    assert stats["diversity_ratio"] >= 0.5, stats  # not one template per digit


def test_dcgan_draws_recognisable_digits_of_every_class():
    stats = sample_statistics(load_checkpoint("dcgan_digits"), load_checkpoint("digit_classifier"))
    assert stats["mean_max_prob"] >= 0.7, stats
    assert min(stats["class_histogram"]) >= 50, stats  # 1,000 samples: no digit (nearly) missing


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_is_deterministic(name):
    g = load_checkpoint(name)
    assert (g.latent_dim, g.image_channels, g.image_size) == (64, 1, 32)
    with torch.no_grad():
        a, b = g(*_inputs(g, 8, seed=3)), g(*_inputs(g, 8, seed=3))
    assert a.shape == (8, 1, 32, 32)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_exports_to_onnx_with_dynamic_batch(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    g = load_checkpoint(name)
    names = ["z", "class_label"][: 1 + (g.num_classes > 0)]
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(g, _inputs(g, 2, seed=0), str(path), dynamo=False, opset_version=17, input_names=names,
                      output_names=["image"], dynamic_axes={n: {0: "batch"} for n in [*names, "image"]})
    inputs = _inputs(g, 5, seed=1)  # a batch size other than the traced one
    out = ort.InferenceSession(str(path)).run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, g(*inputs).numpy(), atol=1e-5)


def test_train_gan_smoke(tmp_path):
    train_gan(["--name", "smoke", "--conditional", "--steps", "2", "--batch-size", "8", "--out-dir", str(tmp_path)])
    meta = json.loads((tmp_path / "smoke.json").read_text())
    assert meta["architecture"] == "DCGANGenerator" and meta["training"]["steps"] == 2
    g = load_checkpoint(tmp_path / "smoke")
    assert g(*_inputs(g, 2, seed=0)).shape == (2, 1, 32, 32)
