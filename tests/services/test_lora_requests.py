"""Requests with LoRA adapters (`lora`), served in process against diffusers.

A tiny random SD folder (tests/fixtures/sd_folder.py) with a PEFT-format and a kohya-format LoRA
(tests/fixtures/lora_files.py) is exported, its adapters stored (`export lora`) and its U-Net and
text encoder given adapter slots (`export lora-slots`): conftest's lora_repositories. An image
with adapters must equal diffusers' `load_lora_weights` + `set_adapters` at the same scales;
requests with different adapter sets (none among them) batched in the engine must each equal that
request alone; what cannot be served is refused naming the field.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.engine.engine import DiffusionEngine, EngineConfig
from services.engine.prompt_cache import PromptCache
from services.engine.request import RequestStatus
from services.errors import InvalidRequest
from services.pipelines.pipeline_stable_diffusion import (
    DiffusionRequest,
    StableDiffusionPipeline,
    discover_stable_diffusion,
    initial_latents,
)
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.engine import drain
from tests.fixtures.images import psnr, psnr_signed
from tests.fixtures.lora_family import use_adapters

pytestmark = pytest.mark.slow
PROMPT, NEGATIVE = "a photo of a red cat", "blue"
STEPS, SEED = 4, 7


@pytest.fixture(scope="module")
def repositories(lora_repositories):
    return lora_repositories


def _pipeline(repo) -> StableDiffusionPipeline:
    """The pipeline with its repository's adapters loaded (as the service's start-up does)."""
    backend = OnnxRuntimeBackend(ModelRepository(repo))
    pipeline = StableDiffusionPipeline(backend, discover_stable_diffusion(backend.models())["sd_random"])
    pipeline.adapters.library.preload()
    return pipeline


@pytest.fixture(scope="module")
def pipeline(repositories):
    return _pipeline(repositories[3])


@pytest.fixture(scope="module")
def reference(repositories):
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    return DiffusersPipeline.from_pretrained(repositories[0], safety_checker=None)


def req(lora=(), prompt=PROMPT, seed=SEED, num_images=1, guidance=5.0, **kw) -> DiffusionRequest:
    return DiffusionRequest(prompt=prompt, negative_prompt=NEGATIVE, num_images=num_images,
                            num_inference_steps=STEPS, guidance_scale=guidance, seed=seed, lora=list(lora), **kw)


def generate(pipeline, request: DiffusionRequest) -> np.ndarray:
    return asyncio.run(pipeline(request)).images


def diffusers_images(reference, files, lora, num_images=1) -> np.ndarray:
    import torch

    use_adapters(reference, files, lora)
    latents = torch.from_numpy(np.stack(initial_latents(SEED, num_images, (4, 8, 8))))
    images = reference(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=num_images,
                       num_inference_steps=STEPS, guidance_scale=5.0, latents=latents, output_type="np").images
    return images.transpose(0, 3, 1, 2) * 2 - 1  # [-1, 1], as ours


@pytest.mark.parametrize("lora", [[("peft", 0.8)], [("kohya", 0.8)], [("peft", 0.5), ("kohya", -0.7)]],
                         ids=["peft", "kohya", "both"])
def test_an_image_with_adapters_matches_diffusers_at_the_same_scales(pipeline, reference, repositories, lora):
    files = repositories[1]
    ours = generate(pipeline, req(lora, num_images=2))
    theirs = diffusers_images(reference, files, lora, num_images=2)
    assert psnr_signed(ours, theirs) >= 35
    assert psnr_signed(ours, generate(pipeline, req(num_images=2))) < 30  # the adapters changed the image


def test_requests_with_different_adapter_sets_in_one_batch_equal_each_alone(pipeline):
    """None, one, the other, both with their own scales: one denoiser call per step for all,
    one text-encoder call for their prompts, each image what it is alone."""
    sets = [[], [("peft", 0.8)], [("kohya", 0.6)], [("peft", 0.3), ("kohya", 1.2)]]
    alone = [generate(pipeline, req(lora, seed=SEED + i)) for i, lora in enumerate(sets)]

    async def batched():
        cache = PromptCache(64)
        engine = DiffusionEngine(pipeline, EngineConfig(32, 10_000), prompt_cache=cache, start_loop=False)
        handles = [engine.submit(req(lora, seed=SEED + i), timeout_s=600) for i, lora in enumerate(sets)]
        await drain(engine, handles)
        assert all(h.status == RequestStatus.FINISHED_DONE for h in handles)
        assert engine.iterations == STEPS  # every request's steps in the same calls
        # The same prompts under other text-encoder adapters are other cache entries: the
        # empty-adapter pair and one pair per adapter set (the pinned "" is not among them).
        assert len(cache) == 2 * len(sets)
        return [h.result.images for h in handles]

    for i, (one, many) in enumerate(zip(alone, asyncio.run(batched()))):
        assert psnr(one, many, peak=2.0) >= 50, sets[i]


def test_img2img_and_inpaint_with_adapters_batched_equal_each_alone(pipeline):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (3, 16, 16)).astype(np.float32)
    mask = (rng.uniform(size=(16, 16)) > 0.5).astype(np.float32)
    requests = [req([("kohya", 0.9)], init_image=image, strength=0.75),
                req([("peft", 0.4)], init_image=image, mask=mask, strength=1.0), req()]
    alone = [generate(pipeline, r) for r in requests]

    async def batched():
        engine = DiffusionEngine(pipeline, EngineConfig(32, 10_000), start_loop=False)
        handles = [engine.submit(r, timeout_s=600) for r in requests]
        await drain(engine, handles)
        return [h.result.images for h in handles]

    for one, many in zip(alone, asyncio.run(batched())):
        assert psnr(one, many, peak=2.0) >= 50


def test_without_adapters_a_slotted_model_gives_the_plain_image(pipeline, repositories):
    plain = _pipeline(repositories[2])
    assert plain.backend.adapter_slots("sd_random_unet") is None
    assert pipeline.backend.adapter_slots("sd_random_unet") is not None
    assert psnr(generate(plain, req()), generate(pipeline, req()), peak=2.0) >= 50


def test_a_model_without_slots_sends_no_slot_input(repositories):
    """Byte-identical to a model that never heard of adapters: the same inputs, nothing more."""
    pipeline = _pipeline(repositories[2])
    sent = []
    infer = pipeline.backend.infer

    async def recording(model, inputs, outputs=None):
        sent.append((model, sorted(inputs)))
        return await infer(model, inputs, outputs)

    pipeline.backend.infer = recording
    generate(pipeline, req())
    for model, names in sent:
        assert names == sorted(t.name for t in pipeline.backend.models()[model].inputs), model


def _body(**kw):
    from services.schemas import Txt2ImgRequest

    return Txt2ImgRequest.model_validate({"prompt": PROMPT, "num_inference_steps": STEPS, **kw})


def _refusal(pipeline, body, limit=4) -> dict:
    from services.diffusion_requests import build_request

    with pytest.raises(InvalidRequest) as info:
        build_request("txt2img", body, pipeline, limit)
    return info.value.body()["error"]


def test_refusals_name_the_field(pipeline, repositories):
    error = _refusal(pipeline, _body(lora=[{"name": "peft"}, {"name": "nope", "scale": 0.5}]))
    assert error["field"] == "lora[1].name" and error["allowed"] == ["kohya", "peft"]
    assert "kohya, peft" in error["message"]
    error = _refusal(pipeline, _body(lora=[{"name": "peft"}, {"name": "kohya"}]), limit=1)
    assert (error["field"], error["limit"]) == ("lora", 1)
    error = _refusal(pipeline, _body(lora=[{"name": "peft"}, {"name": "peft", "scale": 0.2}]))
    assert error["field"] == "lora[1].name" and "twice" in error["message"]
    error = _refusal(_pipeline(repositories[2]), _body(lora=[{"name": "peft"}]))
    assert error["field"] == "lora" and "python -m export lora-slots --pipeline sd_random" in error["message"]
    with pytest.raises(InvalidRequest, match="no adapter 'nope'"):  # the engine checks on its own too
        DiffusionEngine(pipeline, EngineConfig(8, 1000), start_loop=False).submit(req([("nope", 1.0)]), 60)


def test_the_scale_range_is_checked_by_the_schema():
    from pydantic import ValidationError

    from services.schemas import MAX_LORA_SCALE

    with pytest.raises(ValidationError) as info:
        _body(lora=[{"name": "peft", "scale": MAX_LORA_SCALE + 0.5}])
    assert info.value.errors()[0]["loc"] == ("lora", 0, "scale")


def test_a_multipart_form_sends_lora_as_json_text():
    from services.schemas import Img2ImgRequest

    form = {"image": "aGk=", "prompt": PROMPT, "lora": '[{"name": "peft", "scale": 0.5}]'}
    assert Img2ImgRequest.model_validate(form, strict=False).lora[0].scale == 0.5


def test_parameters_echo_lora_and_the_image_metadata_names_the_adapters(pipeline):
    from services.diffusion_requests import build_request
    from services.routers.diffusion import _metas

    body = _body(lora=[{"name": "peft", "scale": 0.8}, {"name": "kohya"}])
    request, params = build_request("txt2img", body, pipeline, 4)
    assert request.lora == [("peft", 0.8), ("kohya", 1.0)]
    assert params["lora"] == [{"name": "peft", "scale": 0.8}, {"name": "kohya", "scale": 1.0}]
    assert _metas("txt2img", "sd_random", body, params, [SEED])[0]["lora"] == params["lora"]
    plain = _body()
    assert "lora" not in _metas("txt2img", "sd_random", plain, build_request("txt2img", plain, pipeline, 4)[1],
                                [SEED])[0]


def test_openai_routes_take_lora_in_extra_body():
    from services.routers.openai_images import ImageGenerationRequest, _genserve_fields
    from services.schemas import Txt2ImgStreamRequest

    body = ImageGenerationRequest.model_validate({"prompt": PROMPT, "lora": [{"name": "peft", "scale": 0.5}]})
    assert Txt2ImgStreamRequest.model_validate(_genserve_fields(body, "sd_random")).lora[0].scale == 0.5


@pytest.mark.server
def test_refusals_over_http_in_the_one_error_shape(server):
    """The demo model has no adapter slots: `lora` is refused naming the field, on genserve's
    routes (422) and OpenAI's (400, its shape); a scale out of range is refused by the schema."""
    import httpx

    def post(path, body):
        return httpx.post(f"{server.url}{path}", json={"prompt": "7", "num_inference_steps": 1, **body}, timeout=60)

    r = post("/v1/txt2img", {"lora": [{"name": "style", "scale": 0.5}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "lora"
    assert "python -m export lora-slots" in r.json()["error"]["message"]
    r = post("/v1/txt2img", {"lora": [{"name": "style", "scale": 9}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "lora.0.scale"
    r = post("/v1/images/generations", {"lora": [{"name": "style"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora"


def test_a_calls_slot_factors_are_built_once_while_its_adapters_stay_the_same(pipeline):
    """Step after step a batch keeps its adapters: the padded factors are reused, equal to what
    slot_inputs builds, and built anew when the call's adapters change."""
    from services.adapters import SCALE_INPUT, slot_inputs

    adapters = pipeline.adapters
    ids = adapters.resolve([("peft", 0.5), ("kohya", 1.0)])
    graph = "sd_random_unet"
    rows = {f"lora:{ids[0]}": np.array([0.5, 0.0], np.float32), f"lora:{ids[1]}": np.array([1.0, 1.0], np.float32)}
    first = adapters.call_inputs(graph, {"sample": np.zeros(2), **rows})
    again = adapters.call_inputs(graph, {"sample": np.zeros(2), **{k: v * 2 for k, v in rows.items()}})
    factors = [k for k in first if k.startswith("lora_down:")]
    assert factors and all(again[k] is first[k] for k in factors)  # reused, not rebuilt
    slots = sorted(ids)  # a call's slots: its adapters in load order
    np.testing.assert_array_equal(again[SCALE_INPUT], np.stack([2 * rows[f"lora:{i}"] for i in slots], axis=1))
    want = slot_inputs(graph, adapters.slots[graph], [adapters.live[i] for i in slots],
                       np.stack([rows[f"lora:{i}"] for i in slots], axis=1))
    for key, value in want.items():
        np.testing.assert_array_equal(first[key], value)
    only = adapters.call_inputs(graph, {"sample": np.zeros(2), f"lora:{ids[0]}": rows[f"lora:{ids[0]}"]})
    assert only[factors[0]] is not first[factors[0]] and only[SCALE_INPUT].shape == (2, 1)
