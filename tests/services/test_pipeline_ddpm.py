"""Pixel-space DDPM/DDIM on the generic pipeline against a reference loop with diffusers'
scheduler objects and the torch UNet2DModel: the same x_T and per-step noise (the
documented per-image generators), class-conditional and not, 1 and 3 channels,
non-square; and on the step engine, an image is the same alone or batched."""

import asyncio

import numpy as np
import pytest
import torch

from services.engine.engine import DiffusionEngine, EngineConfig
from services.pipelines.diffusion import DiffusionRequest, initial_latents
from services.pipelines.pipeline_ddpm import pipelines
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.ddpm_folder import build_random_ddpm_folder
from tests.fixtures.engine import drain
from tests.fixtures.images import psnr_signed as psnr

pytestmark = pytest.mark.slow

VARIANTS = {
    "rgb_conditional": dict(seed=1, conditional=True, channels=3, levels=2, sample_size=16),
    "grey_unconditional_wide": dict(seed=2, conditional=False, channels=1, levels=3, sample_size=(16, 24),
                                    prediction_type="epsilon"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    from diffusers import UNet2DModel

    from export.ddpm import export_ddpm

    folder = build_random_ddpm_folder(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    repo = tmp_path_factory.mktemp(f"{request.param}_repo")
    export_ddpm(folder, repo, "ddpm_test", progress=lambda _: None)
    ours = pipelines(OnnxRuntimeBackend(ModelRepository(repo)))["ddpm_test"]
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    return ours, unet, folder


def reference_loop(unet, folder, scheduler_name, seed, n, steps, labels, shape):
    """diffusers' scheduler objects stepping the torch UNet, noise from the documented generators."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[scheduler_name]
    scheduler = cls.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(steps)
    rows = initial_latents(seed, n, shape)  # x_T: each image's first draw
    generators = [np.random.default_rng(seed + i) for i in range(n)]
    for g, row in zip(generators, rows):  # the step noise continues each image's generator
        g.standard_normal(row.shape, dtype=np.float32)
    seeds_state = generators

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(np.stack([g.standard_normal(tuple(shape[1:]), dtype=np.float32)
                                          for g in seeds_state]))

    original = ddpm_module.randn_tensor
    ddpm_module.randn_tensor = randn_tensor
    try:
        x = torch.from_numpy(np.stack(rows)) * scheduler.init_noise_sigma
        class_labels = None if labels is None else torch.tensor(labels)
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = unet(scheduler.scale_model_input(x, t), t, class_labels=class_labels).sample
                x = scheduler.step(out, t, x).prev_sample
    finally:
        ddpm_module.randn_tensor = original
    return x.clamp(-1, 1).numpy()


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_matches_a_diffusers_reference_loop(variant, scheduler):
    ours, unet, folder = variant
    spec = ours.spec
    labels = [3, 0, 5] if ours.num_classes else None
    out = asyncio.run(ours(DiffusionRequest(num_images=3, num_inference_steps=8, guidance_scale=0.0,
                                            scheduler=scheduler, seed=21, class_labels=labels)))
    want = reference_loop(unet, folder, scheduler, 21, 3, 8, labels,
                          (spec.latent_channels, spec.native_height, spec.native_width))
    assert out.images.shape == want.shape
    assert psnr(out.images, want) >= 35


def test_an_image_is_the_same_alone_or_batched_on_the_engine(variant):
    ours, _, _ = variant

    def labels(n, base):
        return [(base + i) % ours.num_classes for i in range(n)] if ours.num_classes else None

    async def main():
        alone = await ours(DiffusionRequest(num_images=2, num_inference_steps=6, guidance_scale=0.0,
                                            scheduler="ddpm", seed=5, class_labels=labels(2, 1)))
        engine = DiffusionEngine(ours, EngineConfig(16, 10_000), start_loop=False)
        others = [engine.submit(DiffusionRequest(num_images=3, num_inference_steps=s, guidance_scale=0.0,
                                                 scheduler=sch, seed=100 + s, class_labels=labels(3, s)), 600)
                  for s, sch in ((4, "ddim"), (9, "ddpm"), (6, "euler"))]
        mine = engine.submit(DiffusionRequest(num_images=2, num_inference_steps=6, guidance_scale=0.0,
                                              scheduler="ddpm", seed=5, class_labels=labels(2, 1)), 600)
        await drain(engine, [mine, *others])
        return alone.images, mine.result.images
    alone, batched = asyncio.run(main())
    assert psnr(alone, batched) >= 50
