"""The image-to-image pipeline on exported random-weight SR graphs: tiles of any image
equal the untiled output, odd sizes, and tiles of one request and of concurrent requests
sharing batched model calls."""

import asyncio

import numpy as np
import pytest

from export.super_resolution import export_sr
from services.pipelines.pipeline_image_to_image import ImageToImagePipeline, ramp, tile_starts
from services.runtime.batching import AdaptiveBatcher
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.sr_models import write_checkpoints


def psnr(a, b, peak=1.0):
    return 10 * np.log10(peak**2 / np.mean((a.astype(np.float64) - b) ** 2))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr_repo")
    for kind, path in write_checkpoints(root / "checkpoints").items():
        export_sr(path, root / "models", kind, max_batch_size=8)
    return root / "models"


def backend(repo, wait_s=0.0):
    inner = OnnxRuntimeBackend(ModelRepository(repo))
    return AdaptiveBatcher(inner, set(inner.models()), wait_s) if wait_s else inner


def test_tiles_cover_the_image_and_blend_to_one():
    assert tile_starts(100, 32, 8) == [0, 24, 48, 68]
    assert tile_starts(20, 32, 8) == [0]
    w = ramp(16, 4, True, True)
    assert w[0] > 0 and w[-1] > 0 and w[4:12].min() == 1.0
    # Where two tiles overlap by exactly the fade, their weights sum to 1.
    assert np.allclose(ramp(16, 4, False, True)[-4:] + ramp(16, 4, True, False)[:4], 1.0)


@pytest.mark.parametrize("model", ["esrgan", "compact"])
def test_tiled_equals_untiled(repo, model):
    p = ImageToImagePipeline(backend(repo), model)
    image = np.random.default_rng(0).uniform(0, 1, (3, 61, 83)).astype(np.float32)  # odd, not square
    whole = asyncio.run(p(image, tile=96))
    assert whole.tiles == 1 and whole.image.shape == (3, 61 * p.info.scale, 83 * p.info.scale)
    tiled = asyncio.run(p(image, tile=24, tile_overlap=8))
    assert tiled.tiles == len(tile_starts(61, 24, 8)) * len(tile_starts(83, 24, 8)) > 4
    assert psnr(tiled.image, whole.image) >= 45.0


def test_tiles_of_one_request_and_of_concurrent_requests_share_calls(repo):
    b = backend(repo, wait_s=0.05)
    rows = []
    b.add_observer(lambda model, name, batch, seconds: rows.append(batch))
    p = ImageToImagePipeline(b, "compact")
    image = np.random.default_rng(1).uniform(0, 1, (3, 40, 40)).astype(np.float32)

    async def both():
        return await asyncio.gather(p(image, tile=24, tile_overlap=4), p(image[:, ::-1].copy(), tile=24,
                                                                          tile_overlap=4))

    a, c = asyncio.run(both())
    assert a.tiles == c.tiles == 4
    assert sum(rows) == 8 and len(rows) == 1  # eight tiles, one model call
    alone = asyncio.run(ImageToImagePipeline(backend(repo), "compact")(image, tile=24, tile_overlap=4))
    assert np.allclose(a.image, alone.image, atol=1e-5)  # batch-mates change nothing
