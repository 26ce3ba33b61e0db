"""The torch-free latent diffusion pipeline against diffusers' reference implementation."""

import asyncio

import numpy as np
import pytest
import torch

from services.pipelines.pipeline_stable_diffusion import (
    DiffusionRequest,
    PromptTokenizer,
    PromptTooLong,
    StableDiffusionPipeline,
    discover_stable_diffusion,
    initial_latents,
)
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.images import psnr

pytestmark = pytest.mark.slow

PROMPT, NEGATIVE = "a photo of a red cat", "blue"


@pytest.fixture(scope="module")
def pipeline(random_sd):
    _, repo = random_sd
    backend = OnnxRuntimeBackend(ModelRepository(repo))
    return StableDiffusionPipeline(backend, discover_stable_diffusion(backend.models())["sd_random"])


@pytest.fixture(scope="module")
def reference(random_sd):
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    folder, _ = random_sd
    return DiffusersPipeline.from_pretrained(folder, safety_checker=None)


def generate(pipeline, **kw) -> np.ndarray:
    out = asyncio.run(pipeline(DiffusionRequest(**kw)))
    return (out.images.transpose(0, 2, 3, 1) / 2 + 0.5).clip(0, 1)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_txt2img_matches_diffusers_given_the_documented_latents(pipeline, reference, scheduler, guidance):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    reference.scheduler = cls.from_config(reference.scheduler.config)
    ours = generate(pipeline, prompt=PROMPT, negative_prompt=NEGATIVE, num_images=2, num_inference_steps=8,
                    guidance_scale=guidance, scheduler=scheduler, seed=11)
    latents = torch.from_numpy(np.stack(initial_latents(11, 2, (4, 8, 8))))
    theirs = reference(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=8,
                       guidance_scale=guidance, latents=latents, output_type="np").images
    assert ours.shape == theirs.shape == (2, 16, 16, 3)
    assert psnr(ours, theirs, peak=1.0) >= 35


def test_tokenizer_matches_diffusers_and_refuses_to_truncate(random_sd, reference):
    _, repo = random_sd
    te = ModelRepository(repo)["sd_random_text_encoder"]
    tok = PromptTokenizer(te.model_dir / "tokenizer.json", 12, int(te.parameters["genserve.pad_token_id"]))
    for text in [PROMPT, "", "Big, BLUE   cat!", "Zebra ü 7!"]:
        want = reference.tokenizer(text, padding="max_length", max_length=12, truncation=True).input_ids
        assert tok(text).tolist() == want
    with pytest.raises(PromptTooLong) as info:
        tok("a cat " * 10, "negative_prompt")
    assert info.value.field_name == "negative_prompt" and info.value.limit == 12 and info.value.tokens > 12


def test_images_do_not_depend_on_batch_mates(pipeline):
    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=3.0, scheduler="euler_ancestral")
    batch = generate(pipeline, num_images=3, seed=5, **kw)
    alone = generate(pipeline, num_images=1, seed=7, **kw)
    np.testing.assert_allclose(batch[2], alone[0], atol=1e-5)


def test_larger_sizes_and_every_scheduler(pipeline):
    for scheduler in ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "ddpm"]:
        images = generate(pipeline, prompt=PROMPT, num_inference_steps=3, scheduler=scheduler,
                          height=24, width=32, seed=1)
        assert images.shape == (1, 24, 32, 3) and np.isfinite(images).all()


def vae_round_trip(pipeline, image, seed) -> np.ndarray:
    """The input's VAE posterior sample (drawn as the pipeline draws it), decoded."""
    latents = asyncio.run(pipeline.encode_image(image, 1, [np.random.default_rng(seed)]))
    latents = latents / np.float32(pipeline.models.scaling_factor)
    decoded = asyncio.run(pipeline.backend.infer(pipeline.models.vae_decoder, {"latent_sample": latents}))["sample"]
    return (decoded[0].transpose(1, 2, 0) / 2 + 0.5).clip(0, 1)


def test_img2img_strength_controls_distance_from_the_input(pipeline):
    image = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16)).astype(np.float32)
    kw = dict(prompt=PROMPT, num_inference_steps=10, guidance_scale=1.0, seed=2, init_image=image)
    source = vae_round_trip(pipeline, image, seed=2)
    distances = [psnr(generate(pipeline, strength=s, **kw)[0], source, peak=1.0) for s in (0.1, 0.5, 1.0)]
    assert distances[0] > distances[1] > distances[2]


def test_inpaint_with_an_empty_mask_keeps_the_encoded_image(pipeline):
    image = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16)).astype(np.float32)
    kept = generate(pipeline, prompt=PROMPT, num_inference_steps=5, seed=3, init_image=image,
                    mask=np.zeros((16, 16), np.float32), strength=1.0)
    np.testing.assert_allclose(kept[0], vae_round_trip(pipeline, image, seed=3), atol=1e-5)
    repainted = generate(pipeline, prompt=PROMPT, num_inference_steps=5, seed=3, init_image=image,
                         mask=np.ones((16, 16), np.float32), strength=1.0)
    assert psnr(repainted[0], kept[0], peak=1.0) < 30


@pytest.fixture(scope="module")
def demo(repository):
    """(our pipeline, diffusers' pipeline) for the committed demo folder."""
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    from zoo.latent_diffusion import CHECKPOINT as folder

    backend = OnnxRuntimeBackend(ModelRepository(repository))
    ours = StableDiffusionPipeline(backend, discover_stable_diffusion(backend.models())["sd_digits"])
    return ours, DiffusersPipeline.from_pretrained(folder, safety_checker=None)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_demo_txt2img_matches_diffusers(demo, scheduler, guidance):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    pipeline, reference = demo
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    reference.scheduler = cls.from_config(reference.scheduler.config)
    prompt = "a handwritten digit seven"
    ours = generate(pipeline, prompt=prompt, num_images=2, num_inference_steps=10, guidance_scale=guidance,
                    scheduler=scheduler, seed=21)
    latents = torch.from_numpy(np.stack(initial_latents(21, 2, (4, 8, 8))))
    theirs = reference(prompt, num_images_per_prompt=2, num_inference_steps=10, guidance_scale=guidance,
                       latents=latents, output_type="np").images
    assert ours.shape == theirs.shape == (2, 32, 32, 1)
    assert psnr(ours, theirs, peak=1.0) >= 35
