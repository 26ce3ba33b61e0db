"""An SDXL-format folder, exported with `python -m export diffusers` and served over HTTP:
listed with its limits, non-square sizes, size conditioning echoed, the same bytes as the
pipeline alone, image-to-image, and the checks every family owes (tests/fixtures/family_tests.py:
seed rule, stream with previews, refusals); SD models refuse SDXL-only fields by name."""

import asyncio
import base64
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest

from tests.conftest import running_server
from tests.fixtures.family_tests import BadRequest, FamilyServiceTests
from tests.fixtures.sdxl_folder import build_random_sdxl_folder

pytestmark = [pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NAME = "xl_wide"


@pytest.fixture(scope="module")
def sdxl_repository(tmp_path_factory):
    folder = build_random_sdxl_folder(
        tmp_path_factory.mktemp("sdxl"), seed=5, levels=3, block_out_channels=(16, 24, 32), hidden_size=24,
        hidden_size_2=40, projection_dim=16, addition_time_embed_dim=4, sample_size=(8, 12), latents_mean_std=True)
    repo = tmp_path_factory.mktemp("sdxl_repo")
    done = subprocess.run([sys.executable, "-m", "export", "diffusers", "--folder", str(folder), "--name", NAME,
                           "--repository", str(repo)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stable_diffusion_xl" in done.stdout
    # An SDXL ControlNet added to the exported pipeline afterwards, as a user does.
    from tests.fixtures.controlnet_folder import build_random_controlnet_folder

    net = build_random_controlnet_folder(folder, tmp_path_factory.mktemp("sdxl_controlnet") / "edges", seed=2)
    done = subprocess.run([sys.executable, "-m", "export", "controlnet", "--folder", str(net), "--pipeline", NAME,
                           "--name", "edges", "--repository", str(repo)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return repo


@pytest.fixture(scope="module")
def sdxl_server(sdxl_repository, tmp_path_factory):
    yield from running_server({"GENSERVE_MODEL_REPOSITORY": str(sdxl_repository),
                               "GENSERVE_DEFAULT_DIFFUSION_MODEL": NAME}, tmp_path_factory.mktemp("sdxl_server"))


def test_listed_with_its_own_limits(sdxl_server):
    [model] = httpx.get(f"{sdxl_server.url}/v1/models").json()["models"]
    assert model["name"] == NAME and model["pipeline"] == "stable_diffusion_xl"
    p = model["parameters"]
    assert p["height"]["default"] == 16 and p["width"]["default"] == 24  # latents 8x12, VAE factor 2
    assert p["height"]["max"] == 32 and p["width"]["max"] == 48 and p["width"]["multiple_of"] == 8
    assert {"original_size", "target_size", "crops_coords_top_left"} <= set(p)
    names = {t["name"] for t in model["inputs"]}
    residuals = {n for n in names if n.startswith("down_block_res_")} | {"mid_block_res"}  # ControlNet's
    assert names == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"} | residuals


def test_txt2img_non_square_with_size_conditioning_equals_the_pipeline(sdxl_server, sdxl_repository):
    from services.pipelines.diffusion import DiffusionRequest
    from services.pipelines.pipeline_stable_diffusion_xl import pipelines
    from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from services.runtime.repository import ModelRepository

    body = {"prompt": "a photo of a red cat", "negative_prompt": "blue", "seed": 9, "num_images": 2,
            "num_inference_steps": 5, "guidance_scale": 4.0, "scheduler": "euler", "height": 32, "width": 16,
            "original_size": [256, 128], "crops_coords_top_left": [8, 0]}
    r = httpx.post(f"{sdxl_server.url}/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["parameters"]["original_size"] == [256, 128] and out["parameters"]["target_size"] == [32, 16]
    assert out["parameters"]["crops_coords_top_left"] == [8, 0]
    assert (out["images"][0]["height"], out["images"][0]["width"]) == (32, 16)
    pipeline = pipelines(OnnxRuntimeBackend(ModelRepository(sdxl_repository)))[NAME]
    alone = asyncio.run(pipeline(DiffusionRequest(
        prompt=body["prompt"], negative_prompt="blue", num_images=2, num_inference_steps=5, guidance_scale=4.0,
        scheduler="euler", seed=9, height=32, width=16,
        extras={"original_size": (256, 128), "crops_coords_top_left": (8, 0), "target_size": (32, 16)})))
    import io

    from PIL import Image
    served = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["data"])))) for i in out["images"]])
    expected = np.clip(np.rint((alone.images.transpose(0, 2, 3, 1) / 2 + 0.5) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(served, expected)


def test_txt2img_with_a_controlnet_equals_the_pipeline(sdxl_server, sdxl_repository):
    """An SDXL ControlNet over HTTP: listed, a control image (PNG) steering a non-square request,
    the same bytes as the pipeline given the same control image; the image is echoed as a hash."""
    import io

    from PIL import Image

    from services.pipelines.controlnet import ControlUnit
    from services.pipelines.diffusion import DiffusionRequest
    from services.pipelines.pipeline_stable_diffusion_xl import pipelines
    from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from services.runtime.repository import ModelRepository

    [model] = httpx.get(f"{sdxl_server.url}/v1/models").json()["models"]
    assert model["parameters"]["controlnet"]["models"] == ["edges"]
    control = np.random.default_rng(4).integers(0, 256, (32, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(control).save(buffer, format="PNG")
    body = {"prompt": "a photo of a red cat", "seed": 5, "num_inference_steps": 4, "guidance_scale": 3.0,
            "scheduler": "euler", "height": 32, "width": 16,
            "controlnet": [{"model": "edges", "image": base64.b64encode(buffer.getvalue()).decode(),
                            "conditioning_scale": 0.8}]}
    r = httpx.post(f"{sdxl_server.url}/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    echoed = r.json()["parameters"]["controlnet"][0]
    assert echoed["model"] == "edges" and echoed["image_sha256"].startswith("sha256:") and "image" not in echoed
    pipeline = pipelines(OnnxRuntimeBackend(ModelRepository(sdxl_repository)))[NAME]
    unit = ControlUnit("edges", control.transpose(2, 0, 1).astype(np.float32) / 255.0, 0.8)
    alone = asyncio.run(pipeline(DiffusionRequest(prompt=body["prompt"], num_inference_steps=4, guidance_scale=3.0,
                                                  scheduler="euler", seed=5, height=32, width=16, controlnet=[unit])))
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"]))))
    expected = np.clip(np.rint((alone.images[0].transpose(1, 2, 0) / 2 + 0.5) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(served, expected)


def test_img2img(sdxl_server):
    txt = httpx.post(f"{sdxl_server.url}/v1/txt2img", json={"prompt": "a small digit", "seed": 1,
                                                            "num_inference_steps": 4}, timeout=120).json()
    r = httpx.post(f"{sdxl_server.url}/v1/img2img", json={"prompt": "a small digit", "image": txt["images"][0]["data"],
                                                          "strength": 0.5, "num_inference_steps": 4}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["original_size"] == [16, 24]


class TestSDXLFamily(FamilyServiceTests):
    model, pipeline, path = NAME, "stable_diffusion_xl", "/v1/txt2img"
    request: ClassVar[dict] = {"prompt": "a small digit"}
    bad_requests = (
        BadRequest({"prompt": "a cat", "height": 20}, "height"),  # not a multiple of 8
        BadRequest({"prompt": "a cat", "scheduler": "nope"}, "scheduler"),
        BadRequest({"prompt": "a cat", "model": "nope"}, "model", status=404),
    )

    @pytest.fixture
    def service(self, sdxl_server):
        return sdxl_server


def test_sd_models_refuse_sdxl_fields_by_name(server):
    r = httpx.post(f"{server.url}/v1/txt2img", json={"prompt": "7", "target_size": [32, 32]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "target_size"
