"""The committed digit VAE (zoo/checkpoints/vae_digits/) as diffusers and the serving side see it.

The bounds sit below the figures `python -m zoo.vae.evaluate` measured for the committed
weights (recorded in training.json), with margin for other CPUs' float rounding.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from zoo.vae import CHECKPOINT, load_vae  # noqa: E402

# Figures of the committed weights: training.json "figures", `python -m zoo.vae.evaluate`.
MIN_PSNR_DB = 25.0  # measured 26.26 dB
MIN_RECONSTRUCTED_ACCURACY = 0.97  # measured 0.9916 (originals: 1.0)
MIN_SAMPLE_MEAN_MAX_PROB = 0.6  # measured 0.672 (seed 0, 1,000 samples); real digits 0.947
MIN_SAMPLE_CLASSES = 10  # every digit gets at least 2% of N(0, I) samples


@pytest.fixture(scope="module")
def vae():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest on a shared CPU
    yield load_vae()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digit_classifier():
    from zoo.checkpoint import load_checkpoint

    return load_checkpoint("digit_classifier")


def test_folder_is_a_small_safetensors_autoencoder():
    files = {p.name: p for p in CHECKPOINT.iterdir() if p.is_file()}
    assert set(files) == {"config.json", "diffusion_pytorch_model.safetensors", "training.json"}
    assert sum(p.stat().st_size for p in files.values()) < 2_000_000
    config = json.loads(files["config.json"].read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert (config["in_channels"], config["out_channels"], config["latent_channels"]) == (1, 1, 2)
    assert config["sample_size"] == 32 and len(config["block_out_channels"]) == 4  # scale factor 8
    training = json.loads(files["training.json"].read_text())
    assert training["seed"] == 0 and training["steps"] > 0 and training["wall_seconds"] > 0
    assert config["scaling_factor"] == training["scaling_factor"]
    assert {"reconstruction", "sampling"} <= set(training["figures"])


def test_digits_encode_to_2x4x4_and_decode_back(vae):
    from zoo.data import load_digit_images

    x, _ = load_digit_images()
    with torch.no_grad():
        post = vae.encode(x[:3]).latent_dist
        assert post.mean.shape == (3, 2, 4, 4) and post.parameters.shape == (3, 4, 4, 4)
        out = vae.decode(post.mean).sample
    assert out.shape == (3, 1, 32, 32)
    assert (out - x[:3]).abs().mean() < 0.1


def test_scaling_factor_whitens_the_latents(vae):
    """SD's recipe: latents times scaling_factor have unit standard deviation."""
    from zoo.data import load_digit_images

    x, _ = load_digit_images()
    with torch.no_grad():
        means = vae.encode(x).latent_dist.mean
    assert abs((means * vae.config.scaling_factor).std().item() - 1.0) < 0.01


@pytest.mark.slow
def test_reconstructs_held_out_digits(vae, digit_classifier):
    from zoo.vae.evaluate import reconstruction_figures

    figures = reconstruction_figures(vae, digit_classifier)
    assert figures["psnr_db"] > MIN_PSNR_DB
    assert figures["classifier_accuracy_reconstructed"] > MIN_RECONSTRUCTED_ACCURACY


@pytest.mark.slow
def test_decoded_noise_draws_every_digit(vae, digit_classifier):
    from zoo.vae.evaluate import sample_figures

    figures = sample_figures(vae, digit_classifier, n=500, seed=1)
    assert figures["mean_max_prob"] > MIN_SAMPLE_MEAN_MAX_PROB
    assert figures["classes_with_at_least_2pct"] >= MIN_SAMPLE_CLASSES
    assert figures["diversity_ratio"] > 0.5  # not one template per digit
