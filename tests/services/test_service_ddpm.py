"""Pixel-space DDPM over HTTP on the demo `ddpm_digits`: the digit asked for, the documented
seeds and labels, streaming with previews, clear 4xx."""

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.server


def generate(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/ddpm/generate", json=body, timeout=120)


def pixels(body: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["data"])))) for i in body["images"]])


def test_listed_with_its_limits(server):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    ddpm = models["ddpm_digits"]
    assert ddpm["pipeline"] == "ddpm" and ddpm["parameters"]["class_label"] == {"min": 0, "max": 9}
    assert httpx.get(f"{server.url}/v1/models").json()["default_models"]["ddpm"] == "ddpm_digits"


@pytest.mark.slow
def test_draws_the_digit_asked_for(server, classifier):
    hits = 0
    for digit in range(10):
        r = generate(server, seed=10 * digit, num_images=4, class_label=digit)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [i["class_label"] for i in body["images"]] == [digit] * 4
        hits += int((classifier(pixels(body)[:, None] / 127.5 - 1.0) == digit).sum())
    assert hits / 40 >= 0.85


def test_seeds_and_drawn_labels_reproduce_alone(server):
    batch = generate(server, seed=40, num_images=3, num_inference_steps=10, scheduler="ddpm").json()
    labels = [i["class_label"] for i in batch["images"]]
    assert labels == [int(np.random.default_rng(40 + i).integers(10)) for i in range(3)]
    alone = generate(server, seed=42, num_inference_steps=10, scheduler="ddpm").json()
    assert alone["images"][0]["data"] == batch["images"][2]["data"]
    assert batch["parameters"]["class_labels"] == labels


def test_stream_sends_progress_previews_and_the_result(server):
    body = {"seed": 1, "class_label": 3, "num_inference_steps": 6, "preview_every": 3}
    events = []
    with httpx.stream("POST", f"{server.url}/v1/ddpm/generate/stream", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert [n for n, _ in events] == ["progress"] * 3 + ["preview"] + ["progress"] * 3 + ["result"]
    plain = generate(server, **{k: v for k, v in body.items() if k != "preview_every"}).json()
    assert events[-1][1]["images"][0]["data"] == plain["images"][0]["data"]


@pytest.mark.parametrize("body, status, field", [
    ({"class_label": 10}, 422, "class_label"),
    ({"num_images": 17}, 422, "num_images"),
    ({"scheduler": "lms"}, 422, "scheduler"),
    ({"model": "sd_digits"}, 404, "model"),
    ({"prompt": "seven"}, 422, "prompt"),
])
def test_bad_input_gets_a_4xx_naming_the_field(server, body, status, field):
    r = generate(server, **body)
    assert r.status_code == status and r.json()["error"]["field"] == field, r.text
