"""The image-to-image pipeline on exported random-weight SR graphs: tiles of any image
equal the untiled output, odd sizes, and tiles of one request and of concurrent requests
sharing batched model calls."""

import asyncio

import numpy as np
import pytest

from export.super_resolution import export_sr
from services.pipelines.pipeline_image_to_image import ImageToImagePipeline, image_to_image_pipelines, ramp, tile_starts
from services.runtime.batching import AdaptiveBatcher
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.images import psnr
from tests.fixtures.sr_models import write_checkpoints


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
    assert psnr(tiled.image, whole.image, peak=1.0) >= 45.0


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


# -- memory and work bounds ----------------------------------------------------------------
# Run in a process of its own: allocator arenas made by earlier tests' threads would be measured too.
HELD_AFTER_CALLS = """
import asyncio, sys
from pathlib import Path
import numpy as np
from services.memory import limit_arenas, rss_bytes, trim
from services.pipelines.pipeline_image_to_image import ImageToImagePipeline
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository

limit_arenas()  # as the service does
p = ImageToImagePipeline(OnnxRuntimeBackend(ModelRepository(Path(sys.argv[1]))), "esrgan")
asyncio.run(p.calibrate())
trim()
before = rss_bytes()
image = np.random.default_rng(2).uniform(0, 1, (3, 256, 256)).astype(np.float32)
for _ in range(3):
    out = asyncio.run(p(image, tile=256))
    del out
trim()
print(rss_bytes() - before, p.call_bytes(p.layout(256, 256, 256)))
"""


def test_activations_are_freed_after_each_call(repo):
    """The image graphs run without ONNX Runtime's arena, which kept a call's peak for the
    life of the process (+1.47 GB held after one 512x512 x4 upscale): the memory a large
    tile took is back once the request is done (and trimmed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", HELD_AFTER_CALLS, str(repo)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}, timeout=300)
    assert done.returncode == 0, done.stderr
    held, row = (int(v) for v in done.stdout.split()[-2:])
    assert row > 50 * 2**20  # a tile whose activations are worth measuring
    assert held < row / 2, f"{held >> 20} MB held after the calls; one call's activations are {row >> 20} MB"


def test_rows_per_call_fit_the_memory_budget(repo):
    rows = []
    b = backend(repo, wait_s=0.05)
    b.add_observer(lambda model, name, batch, seconds: rows.append(batch))
    p = ImageToImagePipeline(b, "compact", call_budget_bytes=1)
    p.bytes_per_pixel = 10.0
    lay = p.layout(40, 40, 24, 4)
    p.call_budget_bytes = int(2.5 * p.call_bytes(lay))  # two rows fit, three do not
    assert p.rows_per_call(lay) == 2
    image = np.random.default_rng(1).uniform(0, 1, (3, 40, 40)).astype(np.float32)
    out = asyncio.run(p(image, tile=24, tile_overlap=4))
    assert out.tiles == 4 and rows == [2, 2]


def test_a_call_slot_runs_one_image_call_at_a_time(repo):
    """The service's pipelines share one slot: image work takes one call's share of the CPU
    at a time, and diffusion steps run between its calls."""
    inner = backend(repo)
    state = {"now": 0, "most": 0}

    async def infer(model, inputs, outputs=None):
        state["now"] += 1
        state["most"] = max(state["most"], state["now"])
        try:
            await asyncio.sleep(0.01)
            return await OnnxRuntimeBackend.infer(inner, model, inputs, outputs)
        finally:
            state["now"] -= 1

    inner.infer = infer  # under the batcher, as in the service: a wave's tiles are one call
    slot_pipes = image_to_image_pipelines(AdaptiveBatcher(inner, set(inner.models()), 0.05), one_call_at_a_time=True)
    image = np.random.default_rng(3).uniform(0, 1, (3, 40, 40)).astype(np.float32)

    async def both():
        return await asyncio.gather(slot_pipes["compact"](image, tile=24, tile_overlap=4),
                                    slot_pipes["esrgan"](image, tile=24, tile_overlap=4))

    asyncio.run(both())
    assert state["most"] == 1


def test_work_and_tile_bounds_are_checked_before_work(repo):
    from types import SimpleNamespace

    from services.config import ImageSettings, Settings
    from services.errors import InvalidRequest, MemoryLimited
    from services.http import http_status
    from services.memory import MemoryGuard
    from services.routers.image_to_image import check_work

    p = ImageToImagePipeline(backend(repo), "esrgan")
    p.bytes_per_pixel, p.seconds_per_pixel = 100.0, 1e-6
    calls = []
    p._run = lambda tile: calls.append(tile)  # nothing may run
    ctx = SimpleNamespace(settings=Settings(images=ImageSettings(max_work_s=10, call_mb=64)), memory=None)
    check_work(ctx, p, p.layout(256, 256, 128))  # 9 tiles x 262k px x 1 us = 2.4 s: fine
    with pytest.raises(InvalidRequest) as work:
        check_work(ctx, p, p.layout(1024, 1024, 128))  # 81 tiles: 21 s
    assert work.value.field == "image" and work.value.limit == 10 and "GENSERVE_MAX_IMAGE_WORK_S" in str(work.value)
    with pytest.raises(InvalidRequest) as tile:
        check_work(ctx, p, p.layout(512, 512, 512))  # one 2048^2 tile: 400 MB of activations
    assert tile.value.field == "tile" and tile.value.limit < 512 and "GENSERVE_IMAGE_CALL_MB" in str(tile.value)
    full = SimpleNamespace(settings=ctx.settings, memory=MemoryGuard(100 << 20, read_rss=lambda: 90 << 20))
    with pytest.raises(MemoryLimited) as memory:
        check_work(full, p, p.layout(256, 256, 128))  # 16 MB of canvases + 7 rows of 26 MB, 10 MB left
    assert http_status(memory.value) == 503 and memory.value.headers["Retry-After"]
    assert not calls


def test_a_chained_upscale_is_bounded_by_all_its_images(repo):
    """Generating endpoints upscale all their images at once: the work and memory bounds count
    every image, not one (a 64-image request of a bound-sized image was 64x the bound)."""
    from types import SimpleNamespace

    from services.config import ImageSettings, Settings
    from services.errors import InvalidRequest, MemoryLimited
    from services.memory import MemoryGuard
    from services.routers.image_to_image import check_upscale

    p = ImageToImagePipeline(backend(repo), "esrgan")
    p.bytes_per_pixel, p.seconds_per_pixel = 100.0, 1e-6
    ctx = SimpleNamespace(settings=Settings(images=ImageSettings(max_work_s=10, call_mb=64)), memory=None,
                          image_to_image={"esrgan": p})
    stage = SimpleNamespace(model="esrgan")
    assert check_upscale(ctx, stage, 256, 256, images=1) == ("esrgan", p)  # 2.4 s of work
    check_upscale(ctx, stage, 256, 256, images=4)  # 9.4 s
    with pytest.raises(InvalidRequest) as work:
        check_upscale(ctx, stage, 256, 256, images=5)  # 11.8 s
    assert work.value.field == "num_images" and work.value.limit == 10 and "5 images" in str(work.value)
    # Memory: every image's canvas is held at once (16 MB each here) besides one call's rows (~200 MB).
    guard = MemoryGuard(2000 << 20, read_rss=lambda: 1600 << 20)
    spacious = SimpleNamespace(settings=Settings(images=ImageSettings(max_work_s=0, call_mb=64)),
                               memory=guard, image_to_image={"esrgan": p})
    check_upscale(spacious, stage, 256, 256, images=1)
    with pytest.raises(MemoryLimited):
        check_upscale(spacious, stage, 256, 256, images=64)
