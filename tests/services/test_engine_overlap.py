"""The overlapped engine loop (EngineConfig.overlap): the next U-Net call starts as soon as the
last one's outputs are applied, and text encoding, decoding and previews run while it executes.
Images are bit-identical to the loop that runs its stages one after another; cancellations,
deadlines and outages still take effect within one step."""

import asyncio
import time

import numpy as np
import pytest

from services.engine.cost_model import CostModel
from services.engine.engine import DiffusionEngine, EngineConfig
from services.engine.request import RequestStatus
from services.pipelines.pipeline_stable_diffusion import StableDiffusionPipeline, discover_stable_diffusion
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.services.test_engine import req
from tests.services.test_engine_faults import MATES, Faulty, image

pytestmark = pytest.mark.slow

UNET = "sd_random_unet"


class Device(Faulty):
    """The real backend behind a device-like U-Net: each U-Net call takes at least `unet_s`
    (an await, as a GPU or Triton call leaves the event loop free), and every call is logged
    as (model, start, end)."""

    def __init__(self, inner, unet_s: float):
        super().__init__(inner)
        self.unet_s = unet_s
        self.log: list[tuple[str, float, float]] = []
        self.unet_calls: list[tuple[float, int]] = []  # (start, rows)

    async def infer(self, model, inputs, outputs=None):
        start = time.monotonic()
        if model == UNET:
            self.unet_calls.append((start, len(inputs["sample"])))
            await asyncio.sleep(self.unet_s)
        values = await super().infer(model, inputs, outputs)
        self.log.append((model, start, time.monotonic()))
        return values

    def during_unet_calls(self, model: str) -> int:
        """How many calls of `model` ran entirely inside a U-Net call."""
        unet = [(a, b) for m, a, b in self.log if m == UNET]
        return sum(any(a <= s and e <= b for a, b in unet) for m, s, e in self.log if m == model)


def engine_on(backend, overlap: bool, **kw) -> DiffusionEngine:
    models = discover_stable_diffusion(backend.models())["sd_random"]
    return DiffusionEngine(StableDiffusionPipeline(backend, models), EngineConfig(32, 10_000, overlap=overlap),
                           cost=CostModel(32, learn=False), **kw)  # every call takes all rows: batches by steps


@pytest.fixture(scope="module")
def embedded(random_sd):
    return OnnxRuntimeBackend(ModelRepository(random_sd[1]))


@pytest.fixture
def device(embedded):
    return Device(embedded, unet_s=0.03)


def events(handle) -> list[dict]:
    out = []
    while not handle.events.empty():
        e = handle.events.get_nowait()
        if e is not None:
            out.append(e)
    return out


# Mixed parameters: schedulers, guidance on and off, two images, DeepCache, img2img, two sizes.
MIX = [dict(seed=1, steps=6), dict(seed=2, steps=5, scheduler="euler", guidance=0.0),
       dict(seed=3, steps=7, scheduler="dpmpp_2m", cache_interval=2), dict(seed=4, steps=9, guidance=7.5, num_images=2),
       dict(seed=5, steps=8, scheduler="euler_ancestral", init_image=image(), strength=0.6),
       dict(seed=6, steps=4, height=32, width=32)]


def test_images_and_previews_are_bit_identical_with_and_without_overlap(embedded):
    async def run(overlap):
        engine = engine_on(embedded, overlap)
        handles = [engine.submit(req(**kw), timeout_s=600, preview_every=2) for kw in MIX]
        await asyncio.wait_for(asyncio.gather(*(h.done.wait() for h in handles)), timeout=60)
        await engine.close()
        for h in handles:
            assert h.status == RequestStatus.FINISHED_DONE, h.error
        return [(h.result.images, events(h)) for h in handles], engine.iterations

    overlapped, its_overlapped = asyncio.run(run(True))
    serial, its_serial = asyncio.run(run(False))
    assert its_overlapped == its_serial  # the same U-Net calls
    for (images, evs), (images_s, evs_s) in zip(overlapped, serial):
        assert np.array_equal(images, images_s)
        assert [e["step"] for e in evs if e["event"] == "progress"] == [e["step"] for e in evs_s
                                                                        if e["event"] == "progress"]
        previews = [e for e in evs if e["event"] == "preview"]
        previews_s = [e for e in evs_s if e["event"] == "preview"]
        assert previews and [p["step"] for p in previews] == [p["step"] for p in previews_s]
        assert all(np.array_equal(p["images"], q["images"]) for p, q in zip(previews, previews_s))


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_text_encoding_and_decoding_run_while_the_unet_call_executes(device, overlap):
    """A long request runs; a second arrives (its prompt to encode) and finishes (its images to
    decode) meanwhile: overlapped, those calls run inside U-Net calls; in series, never."""
    async def main():
        engine = engine_on(device, overlap)
        long = engine.submit(req(steps=20, seed=1), timeout_s=600)
        while long.trajectory is None or long.trajectory.steps_done < 2:
            await asyncio.sleep(0.005)
        device.log.clear()
        short = engine.submit(req(prompt="a small blue digit", steps=3, seed=2), timeout_s=600)
        await asyncio.wait_for(asyncio.gather(long.done.wait(), short.done.wait()), timeout=30)
        await engine.close()
        assert long.status == short.status == RequestStatus.FINISHED_DONE
    asyncio.run(main())
    encoded, decoded = device.during_unet_calls("sd_random_text_encoder"), device.during_unet_calls(
        "sd_random_vae_decoder")
    if overlap:
        assert encoded == 1 and decoded >= 1  # the short one's prompt and images; the long one's decode is last
    else:
        assert encoded == decoded == 0


def test_a_request_arriving_during_a_call_takes_its_first_step_in_the_next_one(device):
    """Its prompt is encoded beside the call in flight and the next call, planned before it
    arrived, takes it on (the scheduler's join_late): no call passes it by."""
    device.unet_s = 0.08  # room for the encoding beside it on a slow machine

    async def main():
        engine = engine_on(device, overlap=True)
        long = engine.submit(req(steps=30, seed=1), timeout_s=600)  # guided: 2 rows a call
        while long.trajectory is None or long.trajectory.steps_done < 3:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)  # inside a call
        arrived = time.monotonic()
        short = engine.submit(req(steps=3, seed=2, guidance=0.0, prompt="a small blue digit"), timeout_s=600)
        await asyncio.wait_for(asyncio.gather(long.done.wait(), short.done.wait()), timeout=30)
        await engine.close()
        assert short.status == RequestStatus.FINISHED_DONE
        later = [rows for start, rows in device.unet_calls if start > arrived]
        assert later[:3] == [3, 3, 3]  # the next three calls carry its one row beside the long one's two
    asyncio.run(main())


def test_a_cancelled_request_leaves_within_one_step_of_the_call_in_flight(device):
    device.unet_s = 0.05

    async def main():
        engine = engine_on(device, overlap=True)
        doomed = engine.submit(req(steps=40, seed=1), timeout_s=600)
        mate = engine.submit(req(steps=12, seed=2), timeout_s=600)
        while doomed.trajectory is None or doomed.trajectory.steps_done < 3:
            await asyncio.sleep(0.005)
        events(doomed)
        start = time.monotonic()
        engine.cancel(doomed)
        await asyncio.wait_for(doomed.done.wait(), timeout=5)
        took = time.monotonic() - start
        late = [e for e in events(doomed) if e["event"] == "progress"]
        await asyncio.wait_for(mate.done.wait(), timeout=30)
        await engine.close()
        assert doomed.status == RequestStatus.FINISHED_CANCELLED
        assert took < 0.05 + 0.5  # the call in flight, then out
        assert len(late) <= 1  # at most the step already in flight
        assert mate.status == RequestStatus.FINISHED_DONE and not engine.scheduler.requests
    asyncio.run(main())


def test_a_deadline_ends_a_request_within_one_step(device):
    device.unet_s = 0.05

    async def main():
        engine = engine_on(device, overlap=True)
        start = time.monotonic()
        late = engine.submit(req(steps=200, seed=1), timeout_s=0.4)
        await asyncio.wait_for(late.done.wait(), timeout=5)
        waited = time.monotonic() - start
        await engine.close()
        assert late.status == RequestStatus.FINISHED_TIMEOUT
        assert 0.4 <= waited < 0.4 + 0.05 + 0.5
    asyncio.run(main())


def test_an_outage_in_the_middle_pauses_and_resumes_with_identical_images(device):
    device.unet_s = 0.01

    async def run(outage: bool):
        engine = engine_on(device, overlap=True)
        handles = [engine.submit(req(**kw), timeout_s=600) for kw in MATES]
        if outage:
            while handles[0].trajectory is None or handles[0].trajectory.steps_done < 2:
                await asyncio.sleep(0.002)
            device.down = True
            await asyncio.sleep(0.6)
            assert engine.backend_down and not any(h.status.finished for h in handles)
            steps = handles[0].trajectory.steps_done
            await asyncio.sleep(0.3)
            assert handles[0].trajectory.steps_done == steps  # paused where it was
            device.down = False
        await asyncio.wait_for(asyncio.gather(*(h.done.wait() for h in handles)), timeout=30)
        await engine.close()
        for h in handles:
            assert h.status == RequestStatus.FINISHED_DONE, h.error
        return [h.result.images for h in handles]

    clean = asyncio.run(run(False))
    resumed = asyncio.run(run(True))
    assert all(np.array_equal(a, b) for a, b in zip(clean, resumed))


@pytest.mark.parametrize("setting, on_own_cores, overlap", [
    ("auto", True, False), ("auto", False, True), ("1", True, True), ("0", False, False)])
def test_auto_overlaps_only_where_the_denoiser_runs_off_the_workers_cores(setting, on_own_cores, overlap):
    from dataclasses import replace

    from services.config import EngineSettings
    config = EngineConfig.from_settings(replace(EngineSettings(), overlap=setting), 16,
                                        denoiser_on_own_cores=on_own_cores)
    assert config.overlap is overlap
