"""VAE encode/decode on the served graphs against diffusers' AutoencoderKL on the same
inputs, for random folders unlike the demo (1 and 3 image channels, 2 and 3 levels)."""

import asyncio

import numpy as np
import pytest
import torch

from services.pipelines.pipeline_vae import vae_pipelines
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.images import psnr_signed as psnr
from tests.fixtures.vae_folder import build_random_vae_folder

pytestmark = pytest.mark.slow

VARIANTS = {"rgb": dict(seed=1, image_channels=3, latent_channels=4, levels=2),
            "grey_deep": dict(seed=2, image_channels=1, latent_channels=2, levels=3)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    from diffusers import AutoencoderKL

    from export.vae import export_vae

    folder = build_random_vae_folder(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    repo = tmp_path_factory.mktemp(f"{request.param}_repo")
    export_vae(folder, repo, "vae_test", progress=lambda _: None)
    ours = vae_pipelines(OnnxRuntimeBackend(ModelRepository(repo)))["vae_test"]
    return ours, AutoencoderKL.from_pretrained(folder).eval()


def test_encode_and_decode_match_diffusers(variant):
    ours, reference = variant
    c, side = ours.info.image_channels, ours.info.native_size
    image = np.random.default_rng(0).uniform(-1, 1, (c, side, 2 * side)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(image[None])).latent_dist
    mean = asyncio.run(ours.encode(image))
    np.testing.assert_allclose(mean, posterior.mean.numpy(), atol=1e-4)
    sample = asyncio.run(ours.encode(image, seed=3))
    eps = np.random.default_rng(3).standard_normal(mean.shape[1:], dtype=np.float32)
    np.testing.assert_allclose(sample, posterior.mean.numpy() + posterior.std.numpy() * eps, atol=1e-4)
    with torch.no_grad():
        want = reference.decode(torch.from_numpy(sample)).sample.clamp(-1, 1).numpy()
    got = asyncio.run(ours.decode(sample))
    assert got.shape == want.shape and psnr(got, want) >= 35


def test_prior_samples_and_lines_follow_the_documented_rule(variant):
    ours, _ = variant
    z = ours.prior_latents(10, 3)
    assert np.array_equal(z[2], np.random.default_rng(12).standard_normal(ours.info.native_latent, dtype=np.float32))
    line = ours.line(z[0], z[1], 5)
    assert np.allclose(line[0], z[0]) and np.allclose(line[-1], z[1]) and np.allclose(line[2], (z[0] + z[1]) / 2)
