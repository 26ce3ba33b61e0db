"""A FLUX-format folder exported with `python -m export sd` and served over HTTP: listed with
its family, sampler and guidance meaning, its own defaults applied and echoed, the same bytes as
the pipeline alone, streaming with previews, and clear refusals (img2img not served for FLUX yet,
a beta-schedule sampler, a prompt past T5's length)."""

import asyncio
import base64
import io
from typing import ClassVar

import httpx
import numpy as np
import pytest

from tests.conftest import running_server
from tests.fixtures.family_tests import BadRequest, FamilyServiceTests

pytestmark = [pytest.mark.server, pytest.mark.slow]

NAME = "fx"
T5_LENGTH = 16


@pytest.fixture(scope="module")
def flux_repository(flux_export):
    return flux_export[1]  # tests/conftest.py: `python -m export sd ... --native-size 24`


@pytest.fixture(scope="module")
def flux_server(flux_repository, tmp_path_factory):
    yield from running_server({"GENSERVE_MODEL_REPOSITORY": str(flux_repository)},
                              tmp_path_factory.mktemp("flux_server"))


def test_listed_as_flux_with_its_sampler_and_guidance(flux_server):
    [model] = httpx.get(f"{flux_server.url}/v1/models").json()["models"]
    p = model["parameters"]
    assert p["schedulers"] == ["flow_match_euler"] and p["default_scheduler"] == "flow_match_euler"
    assert p["guidance_scale"]["default"] == 3.5 and p["guidance_scale"]["meaning"] == "embedded"
    assert p["prompt_max_tokens"] == T5_LENGTH
    assert p["cache_interval"]["max"] == 1  # DeepCache needs a U-Net's shallow graph
    assert p["height"]["default"] == 24 and p["height"]["multiple_of"] == 4
    assert "/v1/img2img" in model["endpoint"] and "/v1/inpaint" in model["endpoint"]
    assert {t["name"] for t in model["inputs"]} >= {"hidden_states", "img_ids", "guidance", "pooled_projections"}


def test_txt2img_applies_the_models_defaults_and_equals_the_pipeline(flux_server, flux_repository):
    from PIL import Image

    from services.pipelines.diffusion import DiffusionRequest
    from services.pipelines.pipeline_flux import pipelines
    from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from services.runtime.repository import ModelRepository

    body = {"prompt": "a photo of a red cat", "seed": 4, "num_images": 2, "num_inference_steps": 3,
            "height": 16, "width": 24}
    r = httpx.post(f"{flux_server.url}/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["parameters"]["guidance_scale"] == 3.5 and out["parameters"]["scheduler"] == "flow_match_euler"
    pipeline = pipelines(OnnxRuntimeBackend(ModelRepository(flux_repository)))[NAME]
    alone = asyncio.run(pipeline(DiffusionRequest(prompt=body["prompt"], num_images=2, num_inference_steps=3,
                                                  guidance_scale=3.5, scheduler="flow_match_euler", seed=4,
                                                  height=16, width=24)))
    served = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["data"])))) for i in out["images"]])
    expected = np.clip(np.rint((alone.images.transpose(0, 2, 3, 1) / 2 + 0.5) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(served, expected)


def test_img2img_and_inpaint_serve_flux_with_its_strength_rounding(flux_server):
    txt = httpx.post(f"{flux_server.url}/v1/txt2img", json={"prompt": "a small digit", "seed": 2,
                                                           "num_inference_steps": 3}, timeout=120).json()
    image = txt["images"][0]["data"]
    # 4 x 0.1 = 0.4 steps: FLUX's pipelines still run one (SD's would refuse the request)
    r = httpx.post(f"{flux_server.url}/v1/img2img", json={"prompt": "a small digit", "image": image, "strength": 0.1,
                                                          "num_inference_steps": 4, "seed": 1}, timeout=120)
    assert r.status_code == 200, r.text
    from PIL import Image

    mask = Image.new("L", (24, 24), 0)
    mask.paste(255, (12, 0, 24, 24))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    r = httpx.post(f"{flux_server.url}/v1/inpaint", json={
        "prompt": "a small digit", "image": image, "mask": base64.b64encode(buffer.getvalue()).decode(),
        "num_inference_steps": 3, "seed": 1}, timeout=120)
    assert r.status_code == 200, r.text
    before = np.asarray(Image.open(io.BytesIO(base64.b64decode(image))), np.float64)
    after = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"]))), np.float64)
    # the kept half stays near the input (through the VAE), the repainted half does not
    assert np.abs(after[:, :8] - before[:, :8]).mean() < np.abs(after[:, 16:] - before[:, 16:]).mean()


class TestFluxFamily(FamilyServiceTests):
    model, pipeline, path = NAME, "flux", "/v1/txt2img"
    request: ClassVar[dict] = {"prompt": "a small digit"}
    bad_requests = (
        BadRequest({"prompt": "a cat", "scheduler": "ddim"}, "scheduler"),
        BadRequest({"prompt": " ".join(["red"] * 40)}, "prompt"),
        BadRequest({"prompt": "a cat", "height": 18}, "height"),
        BadRequest({"prompt": "a cat", "negative_prompt": "blue"}, "negative_prompt"),  # would be ignored
        # no shallow graph: DeepCache is U-Nets'
        BadRequest({"prompt": "a cat", "cache_interval": 2}, "cache_interval"),
        BadRequest({"prompt": "a cat", "image": base64.b64encode(b"x" * 10).decode()}, "image", path="/v1/img2img"),
    )

    @pytest.fixture
    def service(self, flux_server):
        return flux_server


@pytest.fixture(scope="module")
def flux_on_triton(flux_repository, tmp_path_factory):
    """A real tritonserver serving the FLUX graphs (the transformer is an opset-18 graph from
    torch.export), and the service on GENSERVE_BACKEND=triton in front of it."""
    from tests.fixtures.triton import start_triton

    triton = start_triton(flux_repository, tmp_path_factory.mktemp("flux_triton"))
    try:
        yield from running_server(
            {"GENSERVE_MODEL_REPOSITORY": str(flux_repository), "GENSERVE_BACKEND": "triton",
             "GENSERVE_TRITON_URL": f"127.0.0.1:{triton.grpc_port}", "GENSERVE_TRITON_TIMEOUT_S": "20"},
            tmp_path_factory.mktemp("flux_service_triton"))
    finally:
        triton.terminate()


def test_triton_serves_the_same_images_as_the_embedded_backend(flux_server, flux_on_triton):
    from PIL import Image

    body = {"prompt": "the big blue number", "seed": 8, "num_images": 2, "num_inference_steps": 4}
    images = []
    for service in (flux_server, flux_on_triton):
        r = httpx.post(f"{service.url}/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        images.append(np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["data"]))), np.float64)
                                for i in r.json()["images"]]))
    assert r.json()["backend"] == "triton"
    mse = float(np.mean((images[0] - images[1]) ** 2))
    assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 45


def test_its_vae_is_served_on_the_vae_endpoints_equal_to_diffusers(flux_server, flux_export):
    """FLUX's VAE (16 latent channels, shift_factor) decodes and encodes under the pipeline's
    name, sized by the transformer's native size, as diffusers' AutoencoderKL does (raw latents:
    no scaling or shift, as for every VAE on /v1/vae/*)."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    [model] = httpx.get(f"{flux_server.url}/v1/models").json()["models"]
    assert "/v1/vae/decode" in model["endpoint"] and "/v1/vae/encode" in model["endpoint"]
    vae = AutoencoderKL.from_pretrained(flux_export[0] / "vae").eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = np.random.default_rng(3).standard_normal((1, vae.config.latent_channels, 24 // factor, 24 // factor),
                                                      dtype=np.float32)
    r = httpx.post(f"{flux_server.url}/v1/vae/decode", timeout=60, json={"model": NAME, "latent": {
        "shape": list(latent.shape), "datatype": "FP32", "data": base64.b64encode(latent.tobytes()).decode()}})
    assert r.status_code == 200, r.text
    [image] = r.json()["images"]
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))), np.float64)
    with torch.no_grad():
        reference = vae.decode(torch.from_numpy(latent)).sample[0].clamp(-1, 1)
    expected = ((reference.permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert served.shape[:2] == (24, 24)
    assert np.abs(served.reshape(expected.shape) - expected).max() <= 1  # 8-bit rounding apart

    r = httpx.post(f"{flux_server.url}/v1/vae/encode", timeout=60, json={"model": NAME, "image": image["data"]})
    assert r.status_code == 200, r.text
    t = r.json()["latent"]
    mean = np.frombuffer(base64.b64decode(t["data"]), dtype="<f4").reshape(t["shape"])
    pixels = torch.from_numpy(served.reshape(expected.shape).transpose(2, 0, 1)[None] / 127.5 - 1).float()
    with torch.no_grad():
        expected_mean = vae.encode(pixels).latent_dist.mean.numpy()
    np.testing.assert_allclose(mean, expected_mean, atol=1e-3)
