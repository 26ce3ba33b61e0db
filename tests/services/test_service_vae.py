"""VAE endpoints over HTTP on the demo repository: the standalone demo VAE and the SD
pipeline's VAE by its name; latents in the KServe v2 tensor fields, round trips, sampling,
interpolation, and clear 4xx for latents that do not fit."""

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.server


def post(server, path, body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/vae/{path}", json=body, timeout=60)


def png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def digit(seed: int) -> str:
    """A real digit from the demo data, as the 32x32 PNG the models were trained on."""
    from zoo.data import load_digit_images

    images, _ = load_digit_images()
    return png(np.clip(np.rint((images[seed, 0].numpy() / 2 + 0.5) * 255), 0, 255).astype(np.uint8))


def pixels_of(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))))


def latent(body: dict) -> np.ndarray:
    t = body["latent"]
    assert t["datatype"] == "FP32"
    return np.frombuffer(base64.b64decode(t["data"]), dtype="<f4").reshape(t["shape"])


def tensor(x: np.ndarray) -> dict:
    return {"shape": list(x.shape), "datatype": "FP32", "data": base64.b64encode(x.astype("<f4").tobytes()).decode()}


def test_listed_with_its_latent_shape(server):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    vae = models["vae_digits"]
    assert vae["pipeline"] == "vae" and "/v1/vae/sample" in vae["endpoint"]
    assert len(vae["parameters"]["latent_shape"]) == 3
    assert "/v1/vae/encode" in models["sd_digits"]["endpoint"]


@pytest.mark.parametrize("model", ["vae_digits", "sd_digits"])
def test_encode_decode_round_trip(server, model):
    r = post(server, "encode", {"model": model, "image": digit(3)})
    assert r.status_code == 200, r.text
    mean = latent(r.json())
    assert mean.shape[0] == 1 and np.isfinite(mean).all()
    again = latent(post(server, "encode", {"model": model, "image": digit(3)}).json())
    assert np.array_equal(mean, again)
    drawn = latent(post(server, "encode", {"model": model, "image": digit(3), "sample": True, "seed": 4}).json())
    assert not np.array_equal(drawn, mean)
    r = post(server, "decode", {"model": model, "latent": tensor(mean)})
    assert r.status_code == 200, r.text
    [image] = r.json()["images"]
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"])))).astype(float)
    original = np.asarray(Image.open(io.BytesIO(base64.b64decode(digit(3))))).astype(float)
    assert out.shape == original.shape
    assert np.abs(out - original).mean() < 40  # a reconstruction, not noise


def test_sample_and_interpolate(server):
    r = post(server, "sample", {"seed": 5, "num_images": 3})
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [i["seed"] for i in images] == [5, 6, 7]
    alone = post(server, "sample", {"seed": 7}).json()["images"][0]
    assert alone["data"] == images[2]["data"]
    r = post(server, "interpolate", {"seed_a": 1, "seed_b": 2, "frames": 5})
    assert r.status_code == 200 and len(r.json()["images"]) == 5
    ends = post(server, "sample", {"seed": 1}).json()["images"][0]
    assert np.array_equal(pixels_of(r.json()["images"][0]), pixels_of(ends))  # metadata differs, pixels not
    r = post(server, "interpolate", {"image_a": digit(1), "image_b": digit(2), "frames": 3, "model": "sd_digits"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, field", [
    ({"latent": {"shape": [1, 99, 4, 4], "datatype": "FP32", "data": ""}}, "latent.shape"),
    ({"latent": {"shape": [1, 4, 4, 4], "datatype": "FP32", "data": "AAAA"}}, "latent.data"),
    ({"latent": {"shape": [1, 4, 4, 4], "datatype": "FP16", "data": "AAAA"}}, "latent.datatype"),
    ({"latent": {"shape": [1, 4, 4], "datatype": "FP32", "data": ""}}, "latent.shape"),
])
def test_latents_that_do_not_fit_are_422(server, body, field):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    channels = models["vae_digits"]["parameters"]["latent_shape"][0]
    if body["latent"]["shape"][1:2] == [4]:
        body["latent"]["shape"][1] = channels
    r = post(server, "decode", body)
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


def test_non_finite_latents_and_misuse_are_422(server):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    c, h, w = models["vae_digits"]["parameters"]["latent_shape"]
    bad = np.zeros((1, c, h, w), np.float32)
    bad[0, 0, 0, 0] = np.nan
    assert post(server, "decode", {"latent": tensor(bad)}).json()["error"]["field"] == "latent.data"
    r = post(server, "sample", {"model": "sd_digits"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "model"
    r = post(server, "interpolate", {"seed_a": 1, "image_b": digit(1)})
    assert r.status_code == 422
    r = post(server, "encode", {"image": digit(1), "seed": 3})
    assert r.status_code == 422 and r.json()["error"]["field"] == "seed"
