"""ControlNet over HTTP: `export controlnet` adds one to a pipeline exported earlier; txt2img,
img2img (multipart), inpaint and the stream take `controlnet` units; the response echoes them
with the image's hash; refusals name the unit's field; a pipeline exported without ControlNet
inputs keeps serving and refuses control."""

import asyncio
import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest

from tests.conftest import running_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPT = "a photo of a red cat"
NAME = "sd_random"


@pytest.fixture(scope="module")
def repository(random_sd, tmp_path_factory):
    """sd_random (as `export sd` wrote it earlier) and sd_b take ControlNets (edges for sd_random,
    added by the command line; depth for sd_b); sd_plain was exported without ControlNet inputs."""
    from export.__main__ import main
    from export.controlnet import export_controlnet
    from export.stable_diffusion import export_stable_diffusion
    from tests.fixtures.controlnet_folder import build_random_controlnet_folder

    folder, base = random_sd
    root = tmp_path_factory.mktemp("controlnet_service")
    repo = root / "repository"
    shutil.copytree(base, repo)
    quiet = dict(progress=lambda _: None, deepcache=False)
    export_stable_diffusion(folder, repo, "sd_b", **quiet)
    export_stable_diffusion(folder, repo, "sd_plain", controlnet_inputs=False, **quiet)
    edges, depth = (build_random_controlnet_folder(folder, root / name, seed=seed)
                    for name, seed in (("edges", 1), ("depth", 2)))
    assert main(["controlnet", "--folder", str(edges), "--pipeline", "sd_random", "--repository", str(repo)]) == 0
    export_controlnet(depth, repo, "sd_b", progress=lambda _: None)
    return repo


def test_export_refuses_a_pipeline_without_controlnet_inputs(repository):
    from export.controlnet import ControlNetExportError, export_controlnet

    with pytest.raises(ControlNetExportError, match="without ControlNet inputs"):
        export_controlnet(repository.parent / "edges", repository, "sd_plain", progress=lambda _: None)
    with pytest.raises(ControlNetExportError, match=r"no Stable Diffusion \(1.x/2.x or XL\) pipeline 'sd_nope'"):
        export_controlnet(repository.parent / "edges", repository, "sd_nope", progress=lambda _: None)


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    yield from running_server({"GENSERVE_MODEL_REPOSITORY": str(repository),
                               "GENSERVE_DEFAULT_DIFFUSION_MODEL": NAME, "GENSERVE_DEFAULT_VAE_MODEL": NAME},
                              tmp_path_factory.mktemp("controlnet_server"))


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def control_png(seed=0, height=16, width=16) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decoded(response: dict) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["data"])))) for i in response["images"]])


def alone(repository, name: str, **kw) -> np.ndarray:
    from services.pipelines.pipeline_stable_diffusion import DiffusionRequest, pipelines
    from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from services.runtime.repository import ModelRepository

    pipeline = pipelines(OnnxRuntimeBackend(ModelRepository(repository)))[name]
    out = asyncio.run(pipeline(DiffusionRequest(prompt=PROMPT, **kw)))
    return np.clip(np.rint((out.images.transpose(0, 2, 3, 1) / 2 + 0.5) * 255), 0, 255).astype(np.uint8)


def unit(image: bytes, **kw) -> dict:
    return {"model": "edges", "image": b64(image), **kw}


BASE = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 4, "guidance_scale": 3.0, "scheduler": "ddim"}


def test_listed_per_model(server):
    models = {m["name"]: m["parameters"] for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert models[NAME]["controlnet"]["models"] == ["edges"]
    assert models["sd_b"]["controlnet"]["models"] == ["depth"]
    assert models["sd_plain"]["controlnet"] is None


def test_txt2img_with_control_equals_the_pipeline_and_echoes_a_hash(server, repository):
    from services.pipelines.controlnet import ControlUnit

    image = control_png(1)
    body = {**BASE, "controlnet": [unit(image, conditioning_scale=0.7, guidance_end=0.75)]}
    r = httpx.post(f"{server.url}/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    echoed = r.json()["parameters"]["controlnet"]
    assert echoed == [{"model": "edges", "conditioning_scale": 0.7, "guidance_start": 0.0, "guidance_end": 0.75,
                       "preprocess": None, "canny_thresholds": [100, 200],
                       "image_sha256": "sha256:" + __import__("hashlib").sha256(image).hexdigest()}]
    pixels = np.asarray(__import__("PIL.Image").Image.open(io.BytesIO(image)), np.float32).transpose(2, 0, 1) / 255
    want = alone(repository, NAME, num_inference_steps=4, guidance_scale=3.0, seed=3, height=16, width=16,
                 controlnet=[ControlUnit("edges", pixels, 0.7, 0.0, 0.75)])
    assert np.array_equal(decoded(r.json()), want)
    plain = httpx.post(f"{server.url}/v1/txt2img", json=BASE, timeout=120).json()
    assert not np.array_equal(decoded(plain), want)


def test_canny_preprocessing_and_resizing_as_diffusers(server, repository):
    import cv2
    from PIL import Image

    from services.pipelines.controlnet import ControlUnit

    photo = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    photo[8:24, 8:24] = 255  # a square whose outline canny finds
    body = {**BASE, "controlnet": [unit(png(photo), preprocess="canny", canny_thresholds=[50, 150])]}
    r = httpx.post(f"{server.url}/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    edges = cv2.Canny(np.asarray(Image.fromarray(photo).convert("L")), 50, 150)
    resized = Image.fromarray(np.stack([edges] * 3, -1)).resize((16, 16), Image.LANCZOS)
    pixels = np.asarray(resized, np.float32).transpose(2, 0, 1) / 255
    want = alone(repository, NAME, num_inference_steps=4, guidance_scale=3.0, seed=3, height=16, width=16,
                 controlnet=[ControlUnit("edges", pixels)])
    assert np.array_equal(decoded(r.json()), want)


def test_img2img_multipart_inpaint_and_the_stream_take_control(server):
    init = control_png(5)
    form = {k: str(v) for k, v in BASE.items()} | {"controlnet": json.dumps([{"model": "edges"}])}
    r = httpx.post(f"{server.url}/v1/img2img", data=form, timeout=120,
                   files={"image": ("init.png", init, "image/png"),
                          "controlnet_image_0": ("control.png", control_png(6), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["controlnet"][0]["image_sha256"].startswith("sha256:")
    mask = png(np.full((16, 16), 255, np.uint8))
    r = httpx.post(f"{server.url}/v1/inpaint", timeout=120, json={
        **BASE, "image": b64(init), "mask": b64(mask), "controlnet": [unit(control_png(7))], "guess_mode": True})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["guess_mode"] is True
    with httpx.stream("POST", f"{server.url}/v1/txt2img/stream", timeout=120,
                      json={**BASE, "controlnet": [unit(control_png(8))]}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("event:")]
    assert events[-1] == "event: result"


@pytest.mark.parametrize("body, field, words", [
    ({"controlnet": [{"model": "canny", "image": b64(control_png())}]}, "controlnet[0].model", "no ControlNet"),
    ({"controlnet": [{"model": "depth", "image": b64(control_png())}]}, "controlnet[0].model", "exported for sd_b"),
    ({"controlnet": [{"model": "edges", "image": b64(b"not an image")}]}, "controlnet[0].image", "decodable"),
    ({"controlnet": [{"model": "edges", "image": "***"}]}, "controlnet[0].image", "base64"),
    ({"controlnet": [{"model": "edges", "image": b64(control_png(height=16, width=32))}]}, "controlnet[0].image",
     "aspect ratios differ"),
    ({"controlnet": [{"model": "edges", "image": b64(control_png()), "guidance_start": 0.6, "guidance_end": 0.5}]},
     "controlnet.0", "guidance_start"),
    ({"controlnet": [{"model": "edges", "image": b64(control_png())}], "cache_interval": 2}, "cache_interval",
     "cache_interval must be 1"),
    ({"model": "sd_plain", "controlnet": [{"model": "edges", "image": b64(control_png())}]}, "controlnet",
     "takes no ControlNet"),
], ids=["unknown", "wrong-base", "bad-image", "bad-base64", "size-mismatch", "window", "deepcache", "no-inputs"])
def test_refusals_name_the_field(server, body, field, words):
    r = httpx.post(f"{server.url}/v1/txt2img", json={**BASE, **body}, timeout=60)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and words in error["message"], error


def test_a_pipeline_without_controlnet_inputs_still_serves(server, repository):
    r = httpx.post(f"{server.url}/v1/txt2img", json={**BASE, "model": "sd_plain"}, timeout=120)
    assert r.status_code == 200, r.text
    # The same weights, with and without the residual inputs: zero residuals change nothing.
    with_inputs = httpx.post(f"{server.url}/v1/txt2img", json={**BASE, "model": "sd_b"}, timeout=120)
    assert np.array_equal(decoded(r.json()), decoded(with_inputs.json()))
