"""The FLUX family on the generic pipeline and the step engine against diffusers' FluxPipeline,
on random-weight folders of several configurations: guidance-distilled (guidance embedding)
or not (true classifier-free guidance with the negative prompt), other depths, head counts,
widths and latent channels, square and non-square sizes."""

import asyncio

import numpy as np
import pytest
import torch

from services.pipelines.diffusion import DiffusionRequest, PromptTooLong, initial_latents
from services.pipelines.pipeline_flux import image_ids, pack, pipelines, unpack
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.engine import drain
from tests.fixtures.flux_folder import build_random_flux_folder
from tests.fixtures.images import psnr, to_uint8

pytestmark = pytest.mark.slow

T5_LENGTH = 20
VARIANTS = {
    "dev": dict(seed=3),  # guidance embedding, as FLUX.1-dev
    "schnell": dict(seed=4, guidance_embeds=False, num_layers=2, num_single_layers=2, num_attention_heads=3,
                    attention_head_dim=24, axes_dims_rope=(4, 8, 12), clip_hidden=40, t5_hidden=32,
                    latent_channels=8),
}
PROMPT = "a photo of a red cat"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    from diffusers import FluxPipeline

    from export.flux import export_flux

    name = request.param
    folder = build_random_flux_folder(tmp_path_factory.mktemp(f"flux_{name}"), t5_max_length=32, **VARIANTS[name])
    repo = tmp_path_factory.mktemp(f"flux_{name}_repo")
    export_flux(folder, repo, name, progress=lambda _: None, max_sequence_length=T5_LENGTH, native_size=16)
    ours = pipelines(OnnxRuntimeBackend(ModelRepository(repo)))[name]
    reference = FluxPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return ours, reference


def reference_images(ours, reference, req: DiffusionRequest) -> np.ndarray:
    """diffusers given the packed form of the documented latents; guidance as the model takes it."""
    spec = ours.spec
    shape = (spec.latent_channels, req.height // spec.vae_scale_factor, req.width // spec.vae_scale_factor)
    latents = torch.from_numpy(pack(np.stack(initial_latents(req.seed, req.num_images, shape))))
    return run_diffusers(reference, spec, req, num_images_per_prompt=req.num_images, latents=latents)


def run_diffusers(pipe, spec, req: DiffusionRequest, **call) -> np.ndarray:
    """`pipe` on the request's prompt, steps and size, with guidance as the model takes it: the
    embedded guidance input, or true classifier-free guidance with the negative prompt."""
    guidance = ({"guidance_scale": req.guidance_scale} if spec.guidance == "embedded" else
                {"true_cfg_scale": req.guidance_scale, "negative_prompt": req.negative_prompt})
    with torch.no_grad():
        return pipe(req.prompt, num_inference_steps=req.num_inference_steps, height=req.height, width=req.width,
                    max_sequence_length=T5_LENGTH, output_type="np", **guidance, **call).images


def with_our_noise(monkeypatch, pipeline_module, seed: int) -> None:
    """diffusers draws our numbers, in our order, from one generator of `seed`: the VAE
    posterior's, then the noise's (one image per request)."""
    import diffusers.models.autoencoders.vae as vae_module

    from tests.services.schedulers.conftest import numpy_noise

    noise = numpy_noise([seed])
    for module in (vae_module, pipeline_module):
        monkeypatch.setattr(module, "randn_tensor", noise)


@pytest.mark.parametrize("size, steps, guidance, negative", [
    ((16, 16), 4, 3.5, ""), ((16, 24), 6, 5.0, "blue"), ((24, 8), 3, 1.0, ""), ((32, 32), 2, 0.0, "")])
def test_txt2img_matches_diffusers_given_the_packed_documented_latents(variant, size, steps, guidance, negative):
    ours, reference = variant
    req = DiffusionRequest(prompt=PROMPT, negative_prompt=negative, num_images=2, num_inference_steps=steps,
                           guidance_scale=guidance, scheduler="flow_match_euler", height=size[0], width=size[1],
                           seed=11)
    got = to_uint8(asyncio.run(ours(req)).images.transpose(0, 2, 3, 1))
    want = reference_images(ours, reference, req)
    assert got.shape == want.shape == (2, *size, 3)
    assert psnr(got, np.clip(np.rint(want * 255), 0, 255)) >= 35


def test_guidance_is_an_input_for_distilled_models_and_a_negative_half_for_the_others(variant):
    ours, _ = variant
    req = DiffusionRequest(prompt=PROMPT, num_images=2, num_inference_steps=2, guidance_scale=4.0,
                           scheduler="flow_match_euler", height=16, width=16)
    trajectory = asyncio.run(ours.start(req, asyncio.run(ours.encode_prompts(ours.tokenize(req)))))
    inputs = trajectory.model_inputs()
    if ours.spec.guidance == "embedded":
        assert trajectory.rows == 2 and len(ours.tokenize(req)) == 1
        np.testing.assert_array_equal(inputs["guidance"], [[4.0], [4.0]])
    else:
        assert trajectory.rows == 4 and len(ours.tokenize(req)) == 2 and "guidance" not in inputs
    assert inputs["hidden_states"].shape == (trajectory.rows, 16, 4 * ours.spec.latent_channels)
    assert inputs["timestep"].shape == (trajectory.rows, 1) and inputs["timestep"][0, 0] == np.float32(1.0)


def test_prompts_past_clip_are_truncated_there_as_diffusers_does_and_refused_past_t5(variant):
    ours, reference = variant
    long_prompt = " ".join(["a photo of a red cat"] * 3)  # past CLIP's 12 tokens, within T5's 20
    req = DiffusionRequest(prompt=long_prompt, num_inference_steps=2, guidance_scale=2.0,
                           scheduler="flow_match_euler", height=16, width=16, seed=1)
    got = to_uint8(asyncio.run(ours(req)).images.transpose(0, 2, 3, 1))
    assert psnr(got, np.clip(np.rint(reference_images(ours, reference, req) * 255), 0, 255)) >= 35
    with pytest.raises(PromptTooLong) as exc:
        ours.tokenize(DiffusionRequest(prompt=" ".join(["red"] * 40)))
    assert exc.value.limit == T5_LENGTH and exc.value.field_name == "prompt"


def test_engine_batches_steps_sizes_of_one_bucket_and_guidance_and_equals_each_alone(variant):
    """Requests at different steps, step counts and guidance (one size) share transformer calls
    (per-sample sigmas and guidance); each image equals the request run alone."""
    from services.engine.engine import DiffusionEngine, EngineConfig

    ours, _ = variant
    requests = [DiffusionRequest(prompt=p, num_images=n, num_inference_steps=s, guidance_scale=g,
                                 scheduler="flow_match_euler", height=16, width=24, seed=seed)
                for p, n, s, g, seed in [(PROMPT, 2, 5, 3.5, 1), ("the big blue number", 1, 3, 1.5, 2),
                                         ("a small digit", 1, 4, 0.0, 3)]]
    calls: list[int] = []

    async def run():
        engine = DiffusionEngine(ours, EngineConfig(16, 10_000), start_loop=False)
        denoise = ours.denoise

        async def counting(inputs, keep_features=False):
            calls.append(len(inputs["hidden_states"]))
            return await denoise(inputs, keep_features)

        ours.denoise = counting
        try:
            handles = [engine.submit(r, timeout_s=600) for r in requests]
            await drain(engine, handles)
            return [h.result for h in handles]
        finally:
            ours.denoise = denoise

    together = asyncio.run(run())
    # some call carried rows of more than one request
    assert max(calls) > max(r.num_images * (2 if ours.spec.classifier_free(r) else 1) for r in requests)
    for req, out in zip(requests, together):
        alone = asyncio.run(ours(req))
        np.testing.assert_allclose(out.images, alone.images, atol=1e-5)


def test_packing_round_trips_and_ids_follow_patch_rows_and_columns():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 6)).astype(np.float32)
    packed = pack(x)
    assert packed.shape == (2, 6, 12)
    np.testing.assert_array_equal(packed[0, 1, :4], x[0, 0, 0:2, 2:4].reshape(-1))  # patch (0, 1), channel 0
    np.testing.assert_array_equal(unpack(packed, (3, 4, 6)), x)
    ids = image_ids(1, 2, 3)
    np.testing.assert_array_equal(ids[0, 4], [0, 1, 1])


@pytest.mark.parametrize("strength, steps", [(0.6, 10), (0.55, 10), (0.3, 3)])
def test_img2img_matches_diffusers_flux_img2img_rounding_included(variant, monkeypatch, strength, steps):
    """As FluxImg2ImgPipeline: the VAE posterior sample, then the noise, from the image's own
    generator; the schedule entered at int(n - n * strength) (0.55 x 10 runs 6 steps where SD's
    pipelines run 5; 0.3 x 3 runs 1 where SD's would refuse a zero-step request)."""
    import diffusers.pipelines.flux.pipeline_flux_img2img as img2img_module
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    ours, reference = variant
    pixels = np.random.default_rng(5).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    init = (pixels.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
    req = DiffusionRequest(prompt=PROMPT, num_images=1, num_inference_steps=steps, guidance_scale=3.0,
                           scheduler="flow_match_euler", height=16, width=24, seed=21, init_image=init,
                           strength=strength)
    out = asyncio.run(ours(req))
    trajectory = asyncio.run(ours.start(req, asyncio.run(ours.encode_prompts(ours.tokenize(req)))))
    assert trajectory.num_steps == steps - int(steps - steps * strength)
    with_our_noise(monkeypatch, img2img_module, 21)
    pipe = FluxImg2ImgPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    want = run_diffusers(pipe, ours.spec, req, image=Image.fromarray(pixels), strength=strength)
    got = to_uint8(out.images.transpose(0, 2, 3, 1))
    assert psnr(got, np.clip(np.rint(want * 255), 0, 255)) >= 35


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_matches_diffusers_flux_inpaint(variant, monkeypatch, strength):
    """As FluxInpaintPipeline: the mask taken at the latents' grid (nearest), the known area
    re-noised to each next level with FLUX's forward process and blended back."""
    import diffusers.pipelines.flux.pipeline_flux_inpaint as inpaint_module
    from diffusers import FluxInpaintPipeline
    from PIL import Image

    ours, reference = variant
    pixels = np.random.default_rng(6).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    mask = np.zeros((16, 24), np.uint8)
    mask[:, 12:] = 255
    req = DiffusionRequest(prompt=PROMPT, num_images=1, num_inference_steps=5, guidance_scale=3.0,
                           scheduler="flow_match_euler", height=16, width=24, seed=8, strength=strength,
                           init_image=(pixels.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1),
                           mask=(mask > 127).astype(np.float32))
    got = to_uint8(asyncio.run(ours(req)).images.transpose(0, 2, 3, 1))
    with_our_noise(monkeypatch, inpaint_module, 8)  # (then the masked image's posterior, which FLUX leaves unused)
    pipe = FluxInpaintPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    want = run_diffusers(pipe, ours.spec, req, image=Image.fromarray(pixels), mask_image=Image.fromarray(mask),
                         strength=strength)
    assert psnr(got, np.clip(np.rint(want * 255), 0, 255)) >= 35
