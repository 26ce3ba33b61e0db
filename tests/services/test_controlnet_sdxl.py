"""SDXL ControlNet: a random SDXL folder exported with `export sd` (its U-Net takes ControlNet
residuals, as SD's does), an SDXL ControlNet added afterwards with `export controlnet`, served
against diffusers' StableDiffusionXLControlNetPipeline; requests with and without control share
the step engine's U-Net calls; an SD ControlNet is refused for an SDXL pipeline."""

import asyncio
import shutil

import numpy as np
import pytest
import torch

from services.engine.engine import DiffusionEngine, EngineConfig
from services.engine.request import RequestStatus
from services.pipelines.controlnet import ControlUnit
from services.pipelines.diffusion import DiffusionRequest, initial_latents
from services.pipelines.pipeline_stable_diffusion_xl import pipelines
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.controlnet_folder import control_arguments, diffusers_pipelines, to_pil
from tests.fixtures.engine import drain
from tests.fixtures.images import psnr_signed

pytestmark = pytest.mark.slow

PROMPT, NEGATIVE = "a photo of a red cat", "blue"
NAME = "xl"


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """(SDXL folder, {name: ControlNet folder}, repository)."""
    from export.controlnet import export_controlnet
    from export.stable_diffusion_xl import export_stable_diffusion_xl
    from tests.fixtures.controlnet_folder import build_random_controlnet_folder
    from tests.fixtures.sdxl_folder import build_random_sdxl_folder

    root = tmp_path_factory.mktemp("controlnet_sdxl")
    folder = build_random_sdxl_folder(root / "folder", seed=3)
    repo = root / "repository"
    export_stable_diffusion_xl(folder, repo, NAME, progress=lambda _: None)
    nets = {name: build_random_controlnet_folder(folder, root / name, seed=seed)
            for name, seed in (("edges", 1), ("depth", 2))}
    for name, net in nets.items():
        export_controlnet(net, repo, NAME, name, progress=lambda _: None)
    return folder, nets, repo


@pytest.fixture(scope="module")
def pipeline(controlled):
    return pipelines(OnnxRuntimeBackend(ModelRepository(controlled[2])))[NAME]


def euler(pipe) -> None:
    """The scheduler requests name below."""
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)


@pytest.fixture(scope="module")
def reference(controlled):
    from diffusers import StableDiffusionXLControlNetPipeline

    folder, nets, _ = controlled
    return diffusers_pipelines(StableDiffusionXLControlNetPipeline, folder, nets, prepare=euler)


def control_image(pipeline, seed: int) -> np.ndarray:
    """A [3, H, W] control image at the native size, in [0, 1] as 8-bit pixels (what a PNG carries)."""
    spec = pipeline.spec
    shape = (3, spec.native_height, spec.native_width)
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.float32) / 255.0


def request(units, **kw) -> DiffusionRequest:
    return DiffusionRequest(prompt=PROMPT, negative_prompt=NEGATIVE, controlnet=units, scheduler="euler", **kw)


def ours(pipeline, units, **kw) -> np.ndarray:
    return asyncio.run(pipeline(request(units, **kw))).images


def theirs(pipeline, reference, units, *, num_images=1, num_inference_steps, guidance_scale, seed,
           guess_mode=False) -> np.ndarray:
    spec = pipeline.spec
    pipe = reference(*[u.model for u in units])
    shape = (spec.latent_channels, spec.native_height // spec.vae_scale_factor,
             spec.native_width // spec.vae_scale_factor)
    latents = torch.from_numpy(np.stack(initial_latents(seed, num_images, shape)))
    with torch.no_grad():
        images = pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=num_images,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=latents,
                      height=spec.native_height, width=spec.native_width, output_type="np", guess_mode=guess_mode,
                      **control_arguments(units)).images
    return images.transpose(0, 3, 1, 2) * 2 - 1


@pytest.mark.parametrize("case", ["single", "multi-with-window", "guess-mode", "unguided-two-images"])
def test_sdxl_controlnet_matches_diffusers(pipeline, reference, case):
    units, options = {
        "single": ([ControlUnit("edges", control_image(pipeline, 0), 0.8)], dict(guidance_scale=5.0)),
        "multi-with-window": ([ControlUnit("edges", control_image(pipeline, 0), 1.0),
                               ControlUnit("depth", control_image(pipeline, 1), 0.6, 0.25, 0.75)],
                              dict(guidance_scale=4.0)),
        "guess-mode": ([ControlUnit("depth", control_image(pipeline, 3), 1.0)],
                       dict(guidance_scale=4.0, guess_mode=True)),
        "unguided-two-images": ([ControlUnit("edges", control_image(pipeline, 2), 1.0)],
                                dict(guidance_scale=1.0, num_images=2)),
    }[case]
    kw = dict(num_inference_steps=6, seed=11, **options)
    got, want = ours(pipeline, units, **kw), theirs(pipeline, reference, units, **kw)
    assert got.shape == want.shape
    assert psnr_signed(got, want) >= 35
    plain = ours(pipeline, [], **{k: v for k, v in kw.items() if k != "guess_mode"})
    assert psnr_signed(got, plain) < 30  # control visibly changes the image (the comparison is not blind)


def test_sdxl_requests_with_and_without_control_share_calls_and_equal_each_alone(pipeline):
    requests = [request([ControlUnit("edges", control_image(pipeline, 5), 0.9)], num_inference_steps=5,
                        guidance_scale=4.0, seed=1),
                request([], num_inference_steps=5, guidance_scale=4.0, seed=2),
                request([ControlUnit("depth", control_image(pipeline, 6), 1.1, 0.0, 0.6)], num_inference_steps=5,
                        guidance_scale=2.0, seed=3)]
    alone = [asyncio.run(pipeline(r)).images for r in requests]

    async def batched():
        engine = DiffusionEngine(pipeline, EngineConfig(32, 10_000), start_loop=False)
        handles = [engine.submit(r, timeout_s=600) for r in requests]
        await drain(engine, handles)
        assert all(h.status == RequestStatus.FINISHED_DONE for h in handles)
        assert engine.iterations == 5  # one U-Net call per step for all three
        return [h.result.images for h in handles]

    for one, many in zip(alone, asyncio.run(batched())):
        assert psnr_signed(one, many) >= 50


def test_an_sd_controlnet_is_refused_for_an_sdxl_pipeline(controlled, random_sd, tmp_path):
    from export.controlnet import export_controlnet
    from export.errors import ControlNetExportError
    from tests.fixtures.controlnet_folder import build_random_controlnet_folder

    repo = tmp_path / "repository"
    shutil.copytree(controlled[2], repo)
    sd_net = build_random_controlnet_folder(random_sd[0], tmp_path / "sd_edges", seed=4)
    with pytest.raises(ControlNetExportError) as refused:
        export_controlnet(sd_net, repo, NAME, "sd_edges", progress=lambda _: None)
    assert "made for another base model" in str(refused.value)
    assert not (repo / f"{NAME}_controlnet_sd_edges").exists()


def test_a_controlnet_must_take_the_base_unets_added_conditioning(controlled):
    """Layouts alike, the added conditioning still tells SDXL from SD 1.x/2.x ControlNets apart."""
    import dataclasses

    from diffusers import ControlNetModel

    from export.controlnet import check_fits, residual_layout_of_controlnet
    from export.errors import ControlNetExportError

    _, nets, repo = controlled
    controlnet = ControlNetModel.from_pretrained(nets["edges"])
    layout = residual_layout_of_controlnet(controlnet)
    unet = ModelRepository(repo)[f"{NAME}_unet"]
    check_fits(controlnet, layout, unet)  # its own base: fits
    without_added = dataclasses.replace(unet, inputs=tuple(t for t in unet.inputs
                                                           if t.name not in ("text_embeds", "time_ids")))
    with pytest.raises(ControlNetExportError, match="is for an SDXL U-Net"):
        check_fits(controlnet, layout, without_added)
    fewer_ids = dataclasses.replace(unet, inputs=tuple(
        dataclasses.replace(t, dims=(t.dims[0] - 1,)) if t.name == "time_ids" else t for t in unet.inputs))
    with pytest.raises(ControlNetExportError, match="added conditioning takes"):
        check_fits(controlnet, layout, fewer_ids)


def test_sdxl_img2img_with_controlnet_matches_diffusers(pipeline, controlled, monkeypatch):
    """As StableDiffusionXLControlNetImg2ImgPipeline, drawing our numbers in our order (the VAE
    posterior's, then the noise's)."""
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl_img2img as img2img_module
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline
    from PIL import Image

    from tests.services.schedulers.conftest import numpy_noise

    folder, nets, _ = controlled
    spec = pipeline.spec
    pixels = np.random.default_rng(6).integers(0, 256, (spec.native_height, spec.native_width, 3), dtype=np.uint8)
    unit = ControlUnit("edges", control_image(pipeline, 7), 0.9)
    kw = dict(num_inference_steps=10, guidance_scale=4.0, seed=21, strength=0.6)
    got = ours(pipeline, [unit], init_image=(pixels.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1), **kw)
    noise = numpy_noise([21])
    for module in (vae_module, img2img_module):
        monkeypatch.setattr(module, "randn_tensor", noise)
    pipe = diffusers_pipelines(StableDiffusionXLControlNetImg2ImgPipeline, folder, nets, prepare=euler)("edges")
    with torch.no_grad():
        want = pipe(PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(pixels), control_image=to_pil(unit.image),
                    strength=0.6, num_inference_steps=10, guidance_scale=4.0, controlnet_conditioning_scale=0.9,
                    height=spec.native_height, width=spec.native_width, output_type="np").images
    assert psnr_signed(got, want.transpose(0, 3, 1, 2) * 2 - 1) >= 35
