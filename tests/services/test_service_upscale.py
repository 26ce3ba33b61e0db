"""`POST /v1/upscale` and `/v1/translate` over HTTP, on a repository of random-weight
models built here: two spandrel architectures (ESRGAN x4 .pth, Real-ESRGAN Compact x2
.safetensors) and a translator from a generator file. Parity with the PyTorch model at
odd sizes, tiled; multipart; grey and alpha inputs; and 4xx naming the field and the
limit for bad images, sizes past GENSERVE_MAX_UPSCALE_PIXELS (refused before decoding),
and bad tiling."""

import base64
import io
import textwrap
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import running_server
from tests.fixtures.images import psnr
from tests.fixtures.sr_models import build, write_checkpoints

pytestmark = pytest.mark.server

MAX_PIXELS = 400_000  # output pixels: small, so the limit is reachable with small files

TRANSLATOR = textwrap.dedent('''
    import torch.nn as nn

    def invert(channels=3):
        """A 1x1 convolution: the parity of the path, not of a big model."""
        return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, channels, 1), nn.Tanh())
''')


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from export.super_resolution import export_sr
    from export.translator import export_translator

    root = tmp_path_factory.mktemp("upscale_service")
    repo = root / "models"
    for kind, path in write_checkpoints(root / "checkpoints").items():
        export_sr(path, repo, f"{kind}_random", tile=32, tile_overlap=8)
    (root / "translator.py").write_text(TRANSLATOR)
    torch.manual_seed(3)
    import importlib.util

    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("t_translator", root / "translator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    save_file({k: v.contiguous() for k, v in module.invert().state_dict().items()}, str(root / "t.safetensors"))
    export_translator(f"{root / 'translator.py'}:invert", root / "t.safetensors", repo, "translator_random")
    from export.gan import export_gan

    export_gan("cgan_digits", repo, "cgan_digits")  # generators to chain after: a GAN and a StyleGAN
    from export.__main__ import CHECKPOINTS
    from export.stylegan import export_stylegan_checkpoint

    export_stylegan_checkpoint(CHECKPOINTS / "stylegan_digits", repo, "stylegan_digits")
    env = {"GENSERVE_MODEL_REPOSITORY": str(repo), "GENSERVE_BACKEND": "onnxruntime",
           "GENSERVE_MAX_UPSCALE_PIXELS": str(MAX_PIXELS)}
    yield from running_server(env, root)


def png(image: Image.Image | np.ndarray, fmt="PNG") -> str:
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(image: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image["data"])))


def post(server, path, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60, **kwargs)


def error_of(r: httpx.Response, status: int, field: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field
    return error


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour structure plus noise, uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 5.0 + c) * np.cos(y / 7.0 - c) for c in range(3)], axis=2) * 90 + 128
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind,scale", [("esrgan", 4), ("compact", 2)])
def test_parity_with_pytorch_at_odd_sizes_tiled(served, kind, scale):
    pixels = photo(37, 53, seed=scale)
    r = post(served, "upscale", {"model": f"{kind}_random", "image": png(pixels)})
    assert r.status_code == 200, r.text
    body = r.json()
    [image] = body["images"]
    assert (image["width"], image["height"], image["media_type"]) == (53 * scale, 37 * scale, "image/png")
    assert body["parameters"]["tiles"] == 4 and body["parameters"]["scale"] == scale  # 32-pixel tiles
    assert set(body["timings"]) >= {"inference_seconds", "total_seconds"}
    out = np.asarray(decoded(image))
    assert '"generated": true' in decoded(image).info["Description"]
    with torch.no_grad():
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
        want = build(kind)(x).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255
    assert psnr(out, want) >= 40.0


def test_multipart_grey_and_alpha(served):
    grey = photo(20, 30)[..., 0]
    r = httpx.post(f"{served.url}/v1/upscale", data={"model": "compact_random", "output_format": "png"},
                   files={"image": ("g.png", base64.b64decode(png(grey)), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    out = decoded(r.json()["images"][0])
    assert out.format == "PNG" and out.size == (60, 40) and out.mode == "L"  # grey in, grey out
    twice = httpx.post(f"{served.url}/v1/upscale", data={"model": "compact_random", "tile": ["32", "48"]},
                       files={"image": ("g.png", base64.b64decode(png(grey)), "image/png")}, timeout=60)
    error_of(twice, 422, "tile")  # a form would keep the last one silently
    rgba = np.dstack([photo(20, 30), np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (20, 1))])
    r = post(served, "upscale", {"model": "compact_random", "image": png(rgba)})
    out = np.asarray(decoded(r.json()["images"][0]))
    assert out.shape == (40, 60, 4)
    assert out[:, 0, 3].max() < 20 and out[:, -1, 3].min() > 235  # the alpha ramp, resized
    error_of(post(served, "upscale", {"model": "compact_random", "image": png(rgba), "output_format": "jpeg"}),
             422, "output_format")


def test_sizes_past_the_limit_are_refused_from_the_header(served):
    # x4: 200x200 in would be 640,000 out > 400,000. A tiny file claiming a huge image, too.
    error = error_of(post(served, "upscale", {"model": "esrgan_random", "image": png(photo(200, 200))}), 422, "image")
    assert error["limit"] == MAX_PIXELS
    bomb = png(Image.new("1", (20000, 20000)))
    assert len(bomb) < 100_000
    t0 = time.monotonic()
    error = error_of(post(served, "upscale", {"model": "compact_random", "image": bomb}), 422, "image")
    assert error["limit"] == MAX_PIXELS and time.monotonic() - t0 < 2.0
    ok = post(served, "upscale", {"model": "compact_random", "image": png(photo(200, 200))})  # 400x400 = 160,000
    assert ok.status_code == 200, ok.text


def test_bad_images_modes_and_tiling_are_4xx(served):
    u = {"model": "compact_random"}
    error_of(post(served, "upscale", {**u, "image": "not base64!"}), 422, "image")
    error_of(post(served, "upscale", {**u, "image": base64.b64encode(b"GIF89a nonsense").decode()}), 422, "image")
    sixteen = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    assert error_of(post(served, "upscale", {**u, "image": png(sixteen)}), 422, "image")["allowed"]
    error_of(post(served, "upscale", {**u, "image": png(photo(8, 8)), "tile": 8}), 422, "tile")
    error_of(post(served, "upscale", {**u, "image": png(photo(8, 8)), "tile": 32, "tile_overlap": 16}), 422,
             "tile_overlap")
    assert post(served, "upscale", {"model": "nope", "image": png(photo(8, 8))}).status_code == 404
    error_of(post(served, "upscale", {"image": png(photo(8, 8))}), 422, "model")  # two served: name one
    # A translator is not a super-resolution model, and the other way round.
    assert post(served, "upscale", {"model": "translator_random", "image": png(photo(8, 8))}).status_code == 404
    assert post(served, "translate", {"model": "compact_random", "image": png(photo(8, 8))}).status_code == 404


def test_translate_and_models_list(served):
    pixels = photo(33, 47)
    r = post(served, "translate", {"image": png(pixels)})  # the only translator: the default
    assert r.status_code == 200, r.text
    out = decoded(r.json()["images"][0])
    assert out.size == (47, 33) and r.json()["model"] == "translator_random"
    models = {m["name"]: m for m in httpx.get(f"{served.url}/v1/models").json()["models"]}
    assert models["esrgan_random"]["endpoint"] == "/v1/upscale"
    assert models["esrgan_random"]["parameters"]["scale"] == 4
    assert models["esrgan_random"]["parameters"]["max_output_pixels"] == MAX_PIXELS
    assert models["translator_random"]["endpoint"] == "/v1/translate"


def test_gan_generate_chains_an_upscale(served):
    plain = post(served, "gan/generate", {"seed": 11, "num_images": 2, "class_label": 3}).json()
    r = post(served, "gan/generate", {"seed": 11, "num_images": 2, "class_label": 3,
                                      "upscale": {"model": "esrgan_random", "output_format": "webp"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["upscale"] == {"model": "esrgan_random", "scale": 4, "output_format": "webp"}
    assert set(body["timings"]) >= {"inference_seconds", "upscale_seconds", "total_seconds"}
    for small, big in zip(plain["images"], body["images"]):
        assert (big["width"], big["height"]) == (4 * small["width"], 4 * small["height"])
        assert big["media_type"] == "image/webp" and big["seed"] == small["seed"]
        meta = decoded(big).getexif()[0x010E]
        assert '"upscaled_by": "esrgan_random"' in meta and '"model": "cgan_digits"' in meta
        # The same pixels as generating, then posting the image to /v1/upscale.
        again = post(served, "upscale", {"model": "esrgan_random", "image": small["data"]}).json()["images"][0]
        assert psnr(np.asarray(decoded(big).convert("L")), np.asarray(decoded(again))) > 40
    error_of(post(served, "gan/generate", {"upscale": {"model": "translator_random"}}), 404, "upscale.model")


def test_stylegan_models_on_gan_generate_chain_an_upscale_too(served):
    body = {"model": "stylegan_digits", "seed": 4, "num_images": 2, "class_label": 7}
    plain = post(served, "gan/generate", body).json()
    r = post(served, "gan/generate", {**body, "upscale": {"model": "esrgan_random"}})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["upscale"]["scale"] == 4 and "upscale_seconds" in r.json()["timings"]
    for small, big in zip(plain["images"], r.json()["images"]):
        assert (big["width"], big["height"]) == (4 * small["width"], 4 * small["height"])
        assert big["seed"] == small["seed"] and big["class_label"] == small["class_label"] == 7
        assert '"upscaled_by": "esrgan_random"' in decoded(big).text["Description"]
