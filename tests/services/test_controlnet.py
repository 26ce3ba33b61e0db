"""ControlNet: the torch-free pipeline against diffusers' StableDiffusionControlNetPipeline, and
requests with and without control sharing the step engine's U-Net calls."""

import asyncio
import shutil

import numpy as np
import pytest
import torch

from services.engine.engine import DiffusionEngine, EngineConfig
from services.engine.request import RequestStatus
from services.pipelines.controlnet import ControlUnit
from services.pipelines.pipeline_stable_diffusion import (
    DiffusionRequest,
    StableDiffusionPipeline,
    discover_stable_diffusion,
    initial_latents,
)
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.controlnet_folder import control_arguments, diffusers_pipelines, to_pil
from tests.fixtures.engine import drain
from tests.fixtures.images import psnr_signed

pytestmark = pytest.mark.slow

PROMPT, NEGATIVE = "a photo of a red cat", "blue"
SIZE = 16


@pytest.fixture(scope="module")
def controlled(random_sd, tmp_path_factory):
    """(SD folder, {name: ControlNet folder}, repository): the random SD pipeline as `export sd`
    wrote it, with two ControlNets added afterwards by `export controlnet`."""
    from export.controlnet import export_controlnet
    from tests.fixtures.controlnet_folder import build_random_controlnet_folder

    folder, base = random_sd
    root = tmp_path_factory.mktemp("controlnet")
    repo = root / "repository"
    shutil.copytree(base, repo)
    nets = {name: build_random_controlnet_folder(folder, root / name, seed=seed)
            for name, seed in (("edges", 1), ("depth", 2))}
    for name, net in nets.items():
        export_controlnet(net, repo, "sd_random", name, progress=lambda _: None)
    return folder, nets, repo


@pytest.fixture(scope="module")
def pipeline(controlled):
    backend = OnnxRuntimeBackend(ModelRepository(controlled[2]))
    return StableDiffusionPipeline(backend, discover_stable_diffusion(backend.models())["sd_random"])


@pytest.fixture(scope="module")
def reference(controlled):
    from diffusers import StableDiffusionControlNetPipeline

    folder, nets, _ = controlled
    return diffusers_pipelines(StableDiffusionControlNetPipeline, folder, nets, safety_checker=None)


def control_image(seed: int) -> np.ndarray:
    """A [3, H, W] control image in [0, 1] as 8-bit pixels (what a PNG carries)."""
    return np.random.default_rng(seed).integers(0, 256, (3, SIZE, SIZE)).astype(np.float32) / 255.0


def ours(pipeline, units, **kw) -> np.ndarray:
    request = DiffusionRequest(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, controlnet=units,
                               **kw)
    return asyncio.run(pipeline(request)).images


def theirs(reference, units, *, num_images=1, num_inference_steps, guidance_scale, seed,
           guess_mode=False) -> np.ndarray:
    pipe = reference(*[u.model for u in units])
    latents = torch.from_numpy(np.stack(initial_latents(seed, num_images, (4, SIZE // 2, SIZE // 2))))
    images = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=num_images,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=latents,
                  height=SIZE, width=SIZE, output_type="np", guess_mode=guess_mode, **control_arguments(units)).images
    return images.transpose(0, 3, 1, 2) * 2 - 1


@pytest.mark.parametrize("units, options", [
    ([ControlUnit("edges", control_image(0), 0.8)], dict(guidance_scale=5.0)),
    ([ControlUnit("edges", control_image(0), 1.0)], dict(guidance_scale=1.0, num_images=2)),
    ([ControlUnit("edges", control_image(0), 1.0), ControlUnit("depth", control_image(1), 0.6, 0.25, 0.75)],
     dict(guidance_scale=4.0)),
    ([ControlUnit("edges", control_image(2), 1.2, 0.0, 0.5)], dict(guidance_scale=4.0)),
    ([ControlUnit("depth", control_image(3), 1.0)], dict(guidance_scale=4.0, guess_mode=True)),
], ids=["single", "single-unguided-two-images", "multi-with-window", "window", "guess-mode"])
def test_controlnet_matches_diffusers(pipeline, reference, units, options):
    kw = dict(num_inference_steps=8, seed=11, **options)
    got, want = ours(pipeline, units, **kw), theirs(reference, units, **kw)
    assert got.shape == want.shape
    assert psnr_signed(got, want) >= 35
    plain = ours(pipeline, [], **{k: v for k, v in kw.items() if k != "guess_mode"})
    assert psnr_signed(got, plain) < 30  # control visibly changes the image (the comparison is not blind)


def test_the_same_controlnet_twice_sums_as_diffusers(pipeline, reference):
    units = [ControlUnit("edges", control_image(4), 0.5), ControlUnit("edges", control_image(5), 0.7)]
    kw = dict(num_inference_steps=6, seed=3, guidance_scale=3.0)
    assert psnr_signed(ours(pipeline, units, **kw), theirs(reference, units, **kw)) >= 35


def test_img2img_with_controlnet_matches_diffusers(pipeline, controlled, monkeypatch):
    """As StableDiffusionControlNetImg2ImgPipeline, drawing our numbers in our order (the VAE
    posterior's, then the noise's)."""
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.controlnet.pipeline_controlnet_img2img as img2img_module
    from diffusers import StableDiffusionControlNetImg2ImgPipeline
    from PIL import Image

    from tests.services.schedulers.conftest import numpy_noise

    folder, nets, _ = controlled
    pixels = np.random.default_rng(6).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    unit = ControlUnit("edges", control_image(7), 0.9)
    kw = dict(num_inference_steps=10, guidance_scale=4.0, seed=21, strength=0.6)
    got = ours(pipeline, [unit], init_image=(pixels.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1), **kw)
    noise = numpy_noise([21])
    for module in (vae_module, img2img_module):
        monkeypatch.setattr(module, "randn_tensor", noise)
    pipe = diffusers_pipelines(StableDiffusionControlNetImg2ImgPipeline, folder, nets, safety_checker=None)("edges")
    want = pipe(PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(pixels), control_image=to_pil(unit.image),
                strength=0.6, num_inference_steps=10, guidance_scale=4.0, controlnet_conditioning_scale=0.9,
                height=SIZE, width=SIZE, output_type="np").images
    assert psnr_signed(got, want.transpose(0, 3, 1, 2) * 2 - 1) >= 35


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_with_controlnet_matches_diffusers(pipeline, controlled, monkeypatch, strength):
    """As StableDiffusionControlNetInpaintPipeline with this text-to-image U-Net (latent blending
    outside the mask), drawing our numbers in our order (the VAE posterior's, then the noise's;
    diffusers' third draw, the masked image's posterior, is unused by a 4-channel U-Net)."""
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.controlnet.pipeline_controlnet_inpaint as inpaint_module
    from diffusers import StableDiffusionControlNetInpaintPipeline
    from PIL import Image

    from tests.services.schedulers.conftest import numpy_noise

    folder, nets, _ = controlled
    rng = np.random.default_rng(8)
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[2:12, 4:14] = 255  # repaint a block; keep the rest
    unit = ControlUnit("depth", control_image(9), 1.1)
    kw = dict(num_inference_steps=8, guidance_scale=4.0, seed=23, strength=strength)
    got = ours(pipeline, [unit], init_image=(pixels.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1),
               mask=(mask / 255.0).astype(np.float32), **kw)
    noise = numpy_noise([23])
    for module in (vae_module, inpaint_module):
        monkeypatch.setattr(module, "randn_tensor", noise)
    pipe = diffusers_pipelines(StableDiffusionControlNetInpaintPipeline, folder, nets, safety_checker=None)("depth")
    want = pipe(PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(pixels), mask_image=Image.fromarray(mask),
                control_image=to_pil(unit.image), strength=strength, num_inference_steps=8, guidance_scale=4.0,
                controlnet_conditioning_scale=1.1, height=SIZE, width=SIZE, output_type="np").images
    assert psnr_signed(got, want.transpose(0, 3, 1, 2) * 2 - 1) >= 35
    plain = ours(pipeline, [], init_image=(pixels.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1),
                 mask=(mask / 255.0).astype(np.float32), **kw)
    assert psnr_signed(got, plain) < 30  # the control acts inside the mask


def test_a_mixed_batch_gives_each_request_its_image_alone(pipeline):
    """Requests with different ControlNets, scales, windows, guess mode, steps, guidance and
    schedulers, and requests without control, share every U-Net call; each image equals its
    request run alone."""
    requests = [
        dict(num_inference_steps=6, guidance_scale=4.0, scheduler="ddim", seed=1,
             controlnet=[ControlUnit("edges", control_image(0), 1.0)]),
        dict(num_inference_steps=5, guidance_scale=1.0, scheduler="euler", seed=2),
        dict(num_inference_steps=7, guidance_scale=6.0, scheduler="euler_ancestral", seed=3, num_images=2,
             controlnet=[ControlUnit("depth", control_image(1), 0.5, 0.2, 0.8)]),
        dict(num_inference_steps=4, guidance_scale=3.0, scheduler="dpmpp_2m", seed=4, guess_mode=True,
             controlnet=[ControlUnit("edges", control_image(2), 0.7), ControlUnit("depth", control_image(3), 1.1)]),
        dict(num_inference_steps=6, guidance_scale=5.0, scheduler="ddim", seed=5),
    ]

    def make(kw):
        return DiffusionRequest(prompt=PROMPT, height=SIZE, width=SIZE, **kw)

    async def main():
        alone = [(await pipeline(make(kw))).images for kw in requests]
        engine = DiffusionEngine(pipeline, EngineConfig(32, 10_000), start_loop=False)
        calls = []
        infer = pipeline.backend.infer

        async def counting(model, inputs, *args, **kwargs):
            calls.append((model, len(next(iter(inputs.values())))))
            return await infer(model, inputs, *args, **kwargs)
        pipeline.backend.infer = counting
        try:
            handles = [engine.submit(make(kw), timeout_s=600) for kw in requests]
            await drain(engine, handles)
        finally:
            del pipeline.backend.infer
        assert all(h.status == RequestStatus.FINISHED_DONE for h in handles)
        return alone, [h.result.images for h in handles], calls

    alone, batched, calls = asyncio.run(main())
    for a, b in zip(alone, batched):
        np.testing.assert_allclose(a, b, atol=1e-4)
    unet_rows = [rows for model, rows in calls if model == pipeline.models.unet]
    # The first U-Net call carries every request's rows: 2 + 1 + 4 + 2 + 2, with and without control.
    assert unet_rows[0] == 11
    edges = [rows for model, rows in calls if model.endswith("controlnet_edges")]
    # edges: request 1 (2 rows, guided) and request 4 (guess mode: its conditional row only).
    assert edges[0] == 3
