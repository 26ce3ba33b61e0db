"""The StyleGAN demo and its W space over HTTP: truncation toward w_avg, the mixing
identities, interpolation ends equal to /generate, latents -> synthesize round trips,
edits, and the class bounds the demo must meet."""

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.server
MODEL = "stylegan_digits"


def post(server, path, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/gan/{path}", json={"model": MODEL, **body}, timeout=60)


def pixels(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"])))).astype(int)


def same(a: dict, b: dict) -> bool:
    """Equal images up to one 8-bit level (different batch compositions may round differently)."""
    return np.abs(pixels(a) - pixels(b)).max() <= 1


@pytest.fixture(scope="module")
def info(server):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    return models[MODEL]["parameters"]


def generate(server, seed, **kw) -> dict:
    r = post(server, "generate", seed=seed, **kw)
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


def test_listed_with_its_w_space(info):
    assert info["num_ws"] >= 2 and info["w_dim"] >= 1 and info["class_label"] == {"min": 0, "max": 9}
    assert "class_3" in info["directions"]


def test_generate_reproduces_and_truncates_toward_w_avg(server):
    r = post(server, "generate", seed=11, num_images=3, class_label=4).json()
    assert same(generate(server, 13, class_label=4), r["images"][2])
    # psi = 0: every w is w_avg, whatever the seed (and class): one image.
    a = generate(server, 1, class_label=2, truncation_psi=0.0)
    b = generate(server, 2, class_label=7, truncation_psi=0.0)
    assert same(a, b)


def test_mixing_identities(server, info):
    num_ws = info["num_ws"]
    body = dict(seed=5, style_seed=6, class_label=1, style_class_label=8)
    whole = post(server, "mix", crossover=num_ws, **body).json()["images"][0]
    none = post(server, "mix", crossover=0, **body).json()["images"][0]
    assert same(whole, generate(server, 5, class_label=1))
    assert same(none, generate(server, 6, class_label=8))
    r = post(server, "mix", include_sources=True, **body).json()
    assert len(r["images"]) == 3 and r["parameters"]["crossover"] == num_ws // 2
    assert post(server, "mix", crossover=num_ws + 1, **body).status_code == 422


@pytest.mark.parametrize("space", ["w", "z"])
def test_interpolation_ends_are_the_generate_images(server, space):
    r = post(server, "interpolate", seeds=[3, 9, 4], class_labels=[0, 5, 7], frames=4, space=space)
    assert r.status_code == 200, r.text
    frames = r.json()["images"]
    assert len(frames) == 7  # two segments of 4 sharing their middle end
    assert same(frames[0], generate(server, 3, class_label=0))
    assert same(frames[3], generate(server, 9, class_label=5))
    assert same(frames[-1], generate(server, 4, class_label=7))


def test_interpolation_as_one_animation(server):
    r = post(server, "interpolate", seeds=[1, 2], frames=5, output_format="gif").json()
    [animation] = r["images"]
    assert animation["media_type"] == "image/gif"
    assert Image.open(io.BytesIO(base64.b64decode(animation["data"]))).n_frames == 5


def test_latents_round_trip_through_synthesize_and_edit(server):
    r = post(server, "latents", seeds=[21, 22], class_labels=[3, 6], truncation_psi=0.7).json()
    w = r["w"]
    assert w["shape"][0] == 2 and w["datatype"] == "FP32"
    images = post(server, "synthesize", w=w).json()["images"]
    assert same(images[1], generate(server, 22, class_label=6, truncation_psi=0.7))
    zero = post(server, "edit", seed=21, class_label=3, direction="class_8", strength=0.0).json()["images"][0]
    assert same(zero, generate(server, 21, class_label=3))
    r = post(server, "edit", seed=21, direction="nope")
    assert r.status_code == 422 and r.json()["error"]["field"] == "direction"
    bad = dict(w, shape=[2, w["shape"][1] + 1])
    assert post(server, "synthesize", w=bad).json()["error"]["field"] == "w.shape"


@pytest.mark.slow
def test_classes_and_coarse_styles_hold(server, classifier, info):
    hits = 0
    for digit in range(10):
        r = post(server, "generate", seed=100 * digit, num_images=8, class_label=digit).json()
        hits += int((classifier(np.stack([pixels(i) for i in r["images"]])[:, None] / 127.5 - 1.0) == digit).sum())
    assert hits / 80 >= 0.85
    # Coarse layers from one class, fine layers from another: past the coarse layers the
    # class of the coarse source holds.
    crossover = info["num_ws"] // 2
    kept = 0
    for i in range(40):
        a, b = i % 10, (i + 3) % 10
        image = post(server, "mix", seed=1000 + i, style_seed=2000 + i, class_label=a, style_class_label=b,
                     crossover=crossover).json()["images"][0]
        kept += int(classifier(pixels(image)[None, None] / 127.5 - 1.0)[0] == a)
    assert kept / 40 >= 0.7
