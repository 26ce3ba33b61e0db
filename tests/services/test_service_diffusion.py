"""Diffusion endpoints end to end over HTTP, on the demo text-to-image model."""

import base64
import io
import json
import threading
import time
from typing import ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import running_server
from tests.fixtures.family_tests import BadRequest, FamilyServiceTests

pytestmark = pytest.mark.server

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def post(server, path, body, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=kw.pop("timeout", 120), **kw)


def decode(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["data"]))))


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_txt2img_draws_the_digit_asked_for(server, classifier):
    hits = 0
    for digit in range(10):
        r = post(server, "/v1/txt2img", {"prompt": f"a handwritten digit {DIGITS[digit]}", "num_images": 3,
                                          "seed": 100 * digit, "num_inference_steps": 20, "guidance_scale": 5.0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["timings"]) >= {"text_encoding_seconds", "denoising_seconds", "decoding_seconds"}
        assert body["parameters"]["height"] == body["parameters"]["width"] == 32
        images = np.stack([decode(im) for im in body["images"]])
        assert images.shape == (3, 32, 32)
        hits += int((classifier(images[:, None] / 127.5 - 1.0) == digit).sum())
    assert hits / 30 >= 0.6


def test_same_request_same_bytes_and_img2img_inpaint_work(server):
    body = {"prompt": "the number 3", "seed": 5, "num_inference_steps": 8, "scheduler": "euler_ancestral"}
    a, b = post(server, "/v1/txt2img", body).json(), post(server, "/v1/txt2img", body).json()
    assert a["images"][0]["data"] == b["images"][0]["data"]
    image = a["images"][0]["data"]
    r = post(server, "/v1/img2img", {"prompt": "the number 8", "image": image, "strength": 0.6, "seed": 1,
                                     "num_inference_steps": 10})
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert params["strength"] == 0.6
    # guidance and sampler left out: the SD model's own defaults, in parameters and in the PNG's provenance
    provenance = json.loads(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"]))).text["Description"])
    assert (params["guidance_scale"], params["scheduler"]) == (7.5, "ddim")
    assert (provenance["guidance_scale"], provenance["scheduler"]) == (7.5, "ddim")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    files = {"image": ("in.png", base64.b64decode(image), "image/png"), "mask": ("m.png", buf.getvalue(), "image/png")}
    r = httpx.post(f"{server.url}/v1/inpaint", data={"prompt": "seven", "seed": "2", "num_inference_steps": "10"},
                   files=files, timeout=120)
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0]).astype(int)
    original = decode(a["images"][0]).astype(int)
    # The kept half stays close to the input (VAE round trip), the masked half changes.
    assert np.abs(out[:, :12] - original[:, :12]).mean() < np.abs(out[:, 20:] - original[:, 20:]).mean()


def test_deepcache_over_http(server):
    """cache_interval is listed per model, echoed, deterministic, and changes the image (a
    shallow step is an approximation); img2img takes it too."""
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["models"]
    sd = next(m for m in models if m["name"] == "sd_digits")
    assert sd["parameters"]["cache_interval"] == {"min": 1, "max": 10, "default": 1}
    assert "sd_digits_unet_shallow" in sd["parameters"]["components"]
    body = {"prompt": "a handwritten digit four", "seed": 8, "num_inference_steps": 12}
    exact = post(server, "/v1/txt2img", body).json()
    cached = [post(server, "/v1/txt2img", {**body, "cache_interval": 3}).json() for _ in range(2)]
    assert cached[0]["parameters"]["cache_interval"] == 3 and exact["parameters"]["cache_interval"] == 1
    assert cached[0]["images"][0]["data"] == cached[1]["images"][0]["data"]
    assert cached[0]["images"][0]["data"] != exact["images"][0]["data"]
    r = post(server, "/v1/img2img", {"prompt": "the number 8", "image": exact["images"][0]["data"], "strength": 0.7,
                                     "num_inference_steps": 10, "cache_interval": 2})
    assert r.status_code == 200, r.text


def test_mask_of_another_size_is_refused(server):
    png = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png, format="PNG")
    small = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(small, format="PNG")
    r = post(server, "/v1/inpaint", {"prompt": "7", "image": base64.b64encode(png.getvalue()).decode(),
                                     "mask": base64.b64encode(small.getvalue()).decode()})
    assert r.status_code == 422 and r.json()["error"]["field"] == "mask"


def test_a_client_that_hangs_up_is_cancelled(server):
    before = metric(server, "genserve_engine_requests_finished_total", reason="cancelled")
    body = {"prompt": "a handwritten digit one", "num_inference_steps": 150, "num_images": 8, "height": 64, "width": 64}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/txt2img", body, timeout=1.0)
    with httpx.stream("POST", f"{server.url}/v1/txt2img/stream", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one progress event, then hang up
    deadline = time.monotonic() + 20
    while metric(server, "genserve_engine_requests_finished_total", reason="cancelled") < before + 2:
        assert time.monotonic() < deadline, "cancellations were not counted"
        time.sleep(0.2)
    assert metric(server, "genserve_engine_queue_requests") == 0


@pytest.fixture(scope="module")
def small_queue_server(repository, tmp_path_factory):
    yield from running_server({"GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_MAX_QUEUED_STEPS": "100"},
                              tmp_path_factory.mktemp("small_queue"))


def test_a_full_queue_answers_429_at_once(small_queue_server):
    long = {"prompt": "a handwritten digit six", "num_inference_steps": 100, "height": 64, "width": 64}
    worker = threading.Thread(target=post, args=(small_queue_server, "/v1/txt2img", long), daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    while metric(small_queue_server, "genserve_engine_queue_steps") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    r = post(small_queue_server, "/v1/txt2img", {"prompt": "a handwritten digit six", "num_inference_steps": 50})
    assert r.status_code == 429 and time.monotonic() - t0 < 2.0
    retry_after = int(r.headers["retry-after"])
    assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["limit"] == 100
    worker.join(timeout=120)
    # From the first request on (the engine timed a step at start-up), Retry-After is an
    # estimate of the drain, not a guess: never far above the time the queue really took.
    drained = time.monotonic() - t0
    assert 1 <= retry_after <= max(3, 3 * drained), (retry_after, drained)
    # The cost model behind it is published: GET /v1/models and the metrics.
    described = {m["name"]: m for m in httpx.get(f"{small_queue_server.url}/v1/models").json()["models"]}
    cost = described["sd_digits"]["cost_model"]
    assert cost["measured"] and set(cost["ms_per_call"]) >= {"1", "2", "4", "8", "16"}
    assert 1 <= cost["best_rows"] <= described["sd_digits"]["max_batch_size"] and cost["rows_per_second"] > 0
    assert metric(small_queue_server, "genserve_engine_best_rows", model="sd_digits") >= 1
    assert metric(small_queue_server, "genserve_engine_cost_seconds", model="sd_digits", rows="16") > 0
    assert metric(small_queue_server, "genserve_engine_first_step_seconds_count", model="sd_digits") >= 1


class TestStableDiffusionFamily(FamilyServiceTests):
    model, pipeline, path = "sd_digits", "stable_diffusion", "/v1/txt2img"
    request: ClassVar[dict] = {"prompt": "a handwritten digit two"}
    bad_requests = (
        BadRequest({"prompt": ""}, "prompt"),
        BadRequest({"prompt": "   "}, "prompt"),
        BadRequest({"prompt": "7", "num_inference_steps": 1000}, "num_inference_steps"),
        BadRequest({"prompt": "7", "guidance_scale": -1}, "guidance_scale"),
        BadRequest({"prompt": "7", "height": 33}, "height"),
        BadRequest({"prompt": "7", "width": 4096}, "width"),
        BadRequest({"prompt": "7", "scheduler": "lms"}, "scheduler"),
        BadRequest({"prompt": "seven " * 40}, "prompt"),
        BadRequest({"prompt": "7", "num_images": 9}, "num_images"),
        BadRequest({"prompt": "7", "timeout_s": 100000}, "timeout_s"),
        BadRequest({"prompt": "7", "image": "aGVsbG8="}, "image", path="/v1/img2img"),
        BadRequest({"prompt": "7", "image": "not base64!"}, "image", path="/v1/img2img"),
        BadRequest({"prompt": "7", "model": "nope"}, "model", status=404),
        BadRequest({"prompt": "7", "cache_interval": 0}, "cache_interval"),
        BadRequest({"prompt": "7", "cache_interval": 11}, "cache_interval"),
        BadRequest({"prompt": "7", "image": "aGVsbG8=", "cache_interval": 11}, "cache_interval", path="/v1/img2img"),
    )

    @pytest.fixture
    def service(self, server):
        return server
