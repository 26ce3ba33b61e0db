"""Pixel-space DDPM over HTTP on the demo `ddpm_digits`: the digit asked for, the documented
seeds and labels, streaming with previews, clear 4xx."""

import base64
import io
from typing import ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.family_tests import BadRequest, FamilyServiceTests

pytestmark = pytest.mark.server


def generate(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/ddpm/generate", json=body, timeout=120)


def pixels(body: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["data"])))) for i in body["images"]])


def test_listed_with_its_limits(server):
    listed = httpx.get(f"{server.url}/v1/models").json()
    ddpm = {m["name"]: m for m in listed["models"]}["ddpm_digits"]
    assert ddpm["parameters"]["class_label"] == {"min": 0, "max": 9}
    assert listed["default_models"]["ddpm"] == "ddpm_digits"


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


def test_drawn_labels_follow_the_seeds(server):
    batch = generate(server, seed=40, num_images=3, num_inference_steps=10, scheduler="ddpm").json()
    labels = [i["class_label"] for i in batch["images"]]
    assert labels == [int(np.random.default_rng(40 + i).integers(10)) for i in range(3)]
    assert batch["parameters"]["class_labels"] == labels


class TestDDPMFamily(FamilyServiceTests):
    model, pipeline, path = "ddpm_digits", "ddpm", "/v1/ddpm/generate"
    request: ClassVar[dict] = {"scheduler": "ddpm"}
    steps = 10
    bad_requests = (
        BadRequest({"class_label": 10}, "class_label"),
        BadRequest({"num_images": 17}, "num_images"),
        BadRequest({"scheduler": "lms"}, "scheduler"),
        BadRequest({"model": "sd_digits"}, "model", status=404),
        BadRequest({"prompt": "seven"}, "prompt"),
    )

    @pytest.fixture
    def service(self, server):
        return server
