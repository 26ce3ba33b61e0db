"""The SDXL family on the generic pipeline against diffusers' StableDiffusionXLPipeline,
on random-weight folders of other configurations than any demo: two or three levels,
other widths and hidden sizes, non-square native sizes, VAE latent statistics, with and
without guidance and a negative prompt, DDIM and Euler."""

import asyncio

import numpy as np
import pytest
import torch

from services.pipelines.diffusion import DiffusionRequest, initial_latents
from services.pipelines.pipeline_stable_diffusion_xl import pipelines
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.deepcache import diffusers_deepcache
from tests.fixtures.images import psnr, to_uint8
from tests.fixtures.sdxl_folder import build_random_sdxl_folder

pytestmark = pytest.mark.slow

VARIANTS = {
    "base": dict(seed=3),
    "wide": dict(seed=4, levels=3, block_out_channels=(16, 24, 32), hidden_size=24, hidden_size_2=40,
                 projection_dim=16, addition_time_embed_dim=4, sample_size=(8, 12), force_upcast=False,
                 latents_mean_std=True, scheduler="ddim", force_zeros_for_empty_prompt=False),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(ours, diffusers' pipeline, native latent shape) for one folder."""
    from diffusers import StableDiffusionXLPipeline

    from export.stable_diffusion_xl import export_stable_diffusion_xl

    name = request.param
    folder = build_random_sdxl_folder(tmp_path_factory.mktemp(f"sdxl_{name}"), **VARIANTS[name])
    repo = tmp_path_factory.mktemp(f"sdxl_{name}_repo")
    export_stable_diffusion_xl(folder, repo, name, progress=lambda _: None)
    backend = OnnxRuntimeBackend(ModelRepository(repo))
    ours = pipelines(backend)[name]
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    spec = ours.spec
    shape = (spec.latent_channels, spec.native_height // spec.vae_scale_factor,
             spec.native_width // spec.vae_scale_factor)
    return ours, reference, shape


@pytest.mark.parametrize("scheduler, guidance, negative", [
    ("ddim", 5.0, ""), ("euler", 5.0, "blue"), ("euler", 1.0, ""), ("ddim", 3.0, "a small digit")])
def test_txt2img_matches_diffusers_given_the_documented_latents(variant, scheduler, guidance, negative):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    ours, reference, shape = variant
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    reference.scheduler = cls.from_config(reference.scheduler.config)
    out = asyncio.run(ours(DiffusionRequest(prompt="a photo of a red cat", negative_prompt=negative, num_images=2,
                                            num_inference_steps=6, guidance_scale=guidance, scheduler=scheduler,
                                            seed=7)))
    latents = torch.from_numpy(np.stack(initial_latents(7, 2, shape)))
    with torch.no_grad():
        want = reference("a photo of a red cat", negative_prompt=negative or None, num_images_per_prompt=2,
                         num_inference_steps=6, guidance_scale=guidance, latents=latents,
                         height=ours.spec.native_height, width=ours.spec.native_width, output_type="np").images
    got = to_uint8(out.images.transpose(0, 2, 3, 1))
    assert got.shape == want.shape
    assert psnr(got, np.clip(np.rint(want * 255), 0, 255)) >= 35


def test_deepcache_matches_diffusers_unet_with_its_deep_path_replaced_by_the_cache(variant):
    """cache_interval=3: the shallow graph (SDXL's added conditioning, no text at the shallowest
    level) against diffusers' U-Net handed the cached features (tests/fixtures/deepcache.py)."""
    ours, reference, shape = variant
    from diffusers import EulerDiscreteScheduler

    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    out = asyncio.run(ours(DiffusionRequest(prompt="a photo of a red cat", num_images=2, num_inference_steps=7,
                                            guidance_scale=4.0, scheduler="euler", seed=5, cache_interval=3)))
    latents = torch.from_numpy(np.stack(initial_latents(5, 2, shape)))
    with torch.no_grad(), diffusers_deepcache(reference.unet, 3):
        want = reference("a photo of a red cat", num_images_per_prompt=2, num_inference_steps=7, guidance_scale=4.0,
                         latents=latents, height=ours.spec.native_height, width=ours.spec.native_width,
                         output_type="np").images
    assert psnr(to_uint8(out.images.transpose(0, 2, 3, 1)), np.clip(np.rint(want * 255), 0, 255)) >= 35


def test_size_conditioning_reaches_the_unet_as_diffusers_sends_it(variant):
    """Non-default original/target sizes and crops, at a non-native output size."""
    ours, reference, shape = variant
    h, w = 2 * ours.spec.native_height, ours.spec.native_width
    extras = {"original_size": (64, 48), "target_size": (32, 40), "crops_coords_top_left": (4, 8)}
    out = asyncio.run(ours(DiffusionRequest(prompt="the big blue number", num_images=1, num_inference_steps=4,
                                            guidance_scale=4.0, scheduler="euler", seed=3, height=h, width=w,
                                            extras=extras)))
    latent_shape = (shape[0], h // ours.spec.vae_scale_factor, w // ours.spec.vae_scale_factor)
    from diffusers import EulerDiscreteScheduler

    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    latents = torch.from_numpy(np.stack(initial_latents(3, 1, latent_shape)))
    with torch.no_grad():
        want = reference("the big blue number", num_inference_steps=4, guidance_scale=4.0, latents=latents,
                         height=h, width=w, output_type="np", **extras).images
    assert psnr(to_uint8(out.images.transpose(0, 2, 3, 1)), np.clip(np.rint(want * 255), 0, 255)) >= 35
