"""The engine under faults: a request that breaks fails alone, a backend outage pauses
and resumes requests exactly, Retry-After is sane from the first request, and the
backends classify their failures (503 for outages, 500 for real failures)."""

import asyncio
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from services.engine.engine import DiffusionEngine, EngineConfig
from services.engine.request import EngineRequest, RequestStatus
from services.engine.scheduler import QueueFull
from services.errors import BackendUnavailable, InferenceFailed, InvalidRequest, NonFiniteOutput
from services.http import http_status
from services.pipelines.pipeline_gan import GANPipeline
from services.pipelines.pipeline_stable_diffusion import StableDiffusionPipeline, discover_stable_diffusion
from services.runtime.base import InferenceBackend
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from services.runtime.triton_backend import TritonBackend, classify_error
from tests.services.test_engine import drain, req
from tests.services.test_pipeline_gan import EchoGenerator

pytestmark = pytest.mark.slow


class Faulty(InferenceBackend):
    """The real backend, with faults injected: `down` (a set of model names, or True for
    all) raises BackendUnavailable; `fault(model, inputs)` may return an exception to
    raise; `corrupt(model, inputs, outputs)` may alter the outputs."""

    name = "faulty"

    def __init__(self, inner: InferenceBackend):
        super().__init__()
        self.inner = inner
        self.down: bool | set = False
        self.fault = lambda model, inputs: None
        self.corrupt = lambda model, inputs, outputs: None
        self.calls: list[str] = []

    def models(self):
        return self.inner.models()

    async def is_ready(self):  # as Triton's readiness says: every model loaded
        return not self.down and await self.inner.is_ready()

    async def _execute(self, spec, inputs):  # pragma: no cover - infer() is overridden
        raise NotImplementedError

    async def infer(self, model, inputs, outputs=None):
        self.calls.append(model)
        if self.down is True or (self.down and model in self.down):
            raise BackendUnavailable(f"fake outage of {model}")
        exc = self.fault(model, inputs)
        if exc is not None:
            raise exc
        values = await self.inner.infer(model, inputs, outputs)
        self.corrupt(model, inputs, values)
        return values


@pytest.fixture(scope="module")
def ort(random_sd):
    return OnnxRuntimeBackend(ModelRepository(random_sd[1]))


@pytest.fixture
def faulty(ort):
    return Faulty(ort)


def make_engine(backend, start_loop=False, **kw):
    models = discover_stable_diffusion(backend.models())["sd_random"]
    config = EngineConfig(**{"max_batch_rows": 32, "max_queued_image_steps": 10_000, **kw})
    return DiffusionEngine(StableDiffusionPipeline(backend, models), config, start_loop=start_loop)


# Three requests: two share the 16 px bucket (and so every U-Net call), one runs at 32 px.
MATES = [dict(seed=1, steps=6), dict(seed=2, steps=5, scheduler="euler"), dict(seed=3, steps=4, height=32, width=32)]


def mates():
    return [req(**kw) for kw in MATES]


async def clean_images(backend):
    engine = make_engine(backend)
    handles = [engine.submit(r, timeout_s=600) for r in mates()]
    await drain(engine, handles)
    return [h.result.images for h in handles]


def assert_same_images(handles, expected):
    for h, images in zip(handles, expected):
        assert h.status == RequestStatus.FINISHED_DONE, h.error
        assert np.array_equal(h.result.images, images)


def image(size=16):
    return np.random.default_rng(0).uniform(-1, 1, (3, size, size)).astype(np.float32)


# -- isolation ---------------------------------------------------------------------------
def test_an_exception_in_one_requests_scheduler_step_fails_it_alone(faulty):
    async def main():
        expected = await clean_images(faulty)
        engine = make_engine(faulty)
        handles = [engine.submit(r, timeout_s=600) for r in mates()]
        bad = engine.submit(req(seed=9, steps=6), timeout_s=600)
        for _ in range(2):
            await engine.step()

        def broken(noise_pred, deep_features=None):
            raise RuntimeError("scheduler exploded")
        bad.trajectory.advance = broken
        await drain(engine, [*handles, bad])
        assert bad.status == RequestStatus.FINISHED_ERROR and "exploded" in str(bad.error)
        assert_same_images(handles, expected)
    asyncio.run(main())


def test_zero_effective_steps_forced_past_submit_fails_alone(faulty):
    async def main():
        expected = await clean_images(faulty)
        engine = make_engine(faulty)
        handles = [engine.submit(r, timeout_s=600) for r in mates()]
        # int(20 * 0.04) == 0: an empty schedule, which used to kill every request in flight.
        bad = EngineRequest(req(steps=20, init_image=image(), strength=0.04), deadline=time.monotonic() + 600)
        engine.scheduler.add_request(bad)
        await drain(engine, [*handles, bad])
        assert bad.status == RequestStatus.FINISHED_ERROR
        assert_same_images(handles, expected)
    asyncio.run(main())


def test_non_finite_latents_fail_their_request_with_a_clear_error(faulty):
    async def main():
        expected = await clean_images(faulty)
        engine = make_engine(faulty)
        handles = [engine.submit(r, timeout_s=600) for r in mates()]
        bad = engine.submit(req(prompt="a small digit", seed=9), timeout_s=600)
        await engine.step()
        poison = bad.trajectory.cond["encoder_hidden_states"][-1]  # its positive prompt's embedding marks its rows

        def nan_rows(model, inputs, outputs):
            if model == engine.pipeline.models.unet:
                rows = (inputs["encoder_hidden_states"] == poison).all(axis=(1, 2))
                outputs["noise_pred"][rows] = np.nan
        faulty.corrupt = nan_rows
        await drain(engine, [*handles, bad])
        assert bad.status == RequestStatus.FINISHED_ERROR
        assert isinstance(bad.error, NonFiniteOutput) and http_status(bad.error) == 500
        assert "non-finite" in bad.error.message
        assert_same_images(handles, expected)
    asyncio.run(main())


def test_a_request_that_poisons_the_shared_unet_call_fails_alone(faulty):
    async def main():
        expected = await clean_images(faulty)
        engine = make_engine(faulty)
        handles = [engine.submit(r, timeout_s=600) for r in mates()]
        bad = engine.submit(req(prompt="a small digit", seed=9), timeout_s=600)
        await engine.step()
        poison = bad.trajectory.cond["encoder_hidden_states"][-1]

        def refuse(model, inputs):
            if model == engine.pipeline.models.unet and (inputs["encoder_hidden_states"] == poison).all(
                    axis=(1, 2)).any():
                return InferenceFailed("the U-Net refused this batch")
        faulty.fault = refuse
        await drain(engine, [*handles, bad])
        assert bad.status == RequestStatus.FINISHED_ERROR and isinstance(bad.error, InferenceFailed)
        assert_same_images(handles, expected)  # its batch-mates were retried without it
    asyncio.run(main())


def test_a_failing_unet_call_fails_only_its_requests_and_the_loop_goes_on(faulty):
    async def main():
        engine = make_engine(faulty)
        small = [engine.submit(req(seed=s), timeout_s=600) for s in (1, 2)]
        large = [engine.submit(req(seed=s, height=32, width=32), timeout_s=600) for s in (3, 4)]
        faulty.fault = lambda model, inputs: (
            ValueError("32 px U-Net broken") if model == engine.pipeline.models.unet
            and inputs["sample"].shape[-1] == 16 else None)
        await drain(engine, [*small, *large])
        assert all(h.status == RequestStatus.FINISHED_DONE for h in small)
        assert all(h.status == RequestStatus.FINISHED_ERROR and "broken" in str(h.error) for h in large)
        later = engine.submit(req(seed=5), timeout_s=600)  # the engine still serves
        await drain(engine, [later])
        assert later.status == RequestStatus.FINISHED_DONE
    asyncio.run(main())


def test_a_decode_that_fails_for_one_request_fails_it_alone(faulty):
    async def main():
        expected = await clean_images(faulty)
        engine = make_engine(faulty)
        handles = [engine.submit(r, timeout_s=600) for r in mates()]
        bad = engine.submit(req(seed=9, steps=6), timeout_s=600)
        await engine.step()
        marker = bad.trajectory.decoder_input  # its latents, recognised at decode

        def refuse(model, inputs):
            if model == engine.pipeline.models.vae_decoder and bad.trajectory is not None and any(
                    np.array_equal(row, marker()[0]) for row in inputs["latent_sample"]):
                return InferenceFailed("the VAE refused")
        faulty.fault = refuse
        await drain(engine, [*handles, bad])
        assert bad.status == RequestStatus.FINISHED_ERROR and "VAE" in str(bad.error)
        assert_same_images(handles, expected)
    asyncio.run(main())


def test_submit_refuses_a_request_with_no_denoising_step(faulty):
    engine = make_engine(faulty)
    with pytest.raises(InvalidRequest) as info:
        engine.submit(req(steps=20, init_image=image(), strength=0.04), timeout_s=600)
    assert info.value.field == "strength" and info.value.limit == 0.05
    assert "num_inference_steps=20, strength must be at least 0.05" in info.value.message
    assert not engine.scheduler.requests
    for n in range(1, 151):  # the limit given is always enough
        with pytest.raises(InvalidRequest) as refused:
            engine.submit(req(steps=n, init_image=image(), strength=0.0), timeout_s=600)
        limit = refused.value.limit
        assert int(n * limit) >= 1 and limit - 1 / n < 1e-4


# -- outages -----------------------------------------------------------------------------
@pytest.mark.parametrize("down", [True, {"sd_random_vae_decoder"}, {"sd_random_text_encoder"}],
                         ids=["everything", "vae", "text-encoder"])
def test_an_outage_pauses_requests_and_they_resume_with_identical_images(faulty, down):
    async def main():
        expected = await clean_images(faulty)
        engine = make_engine(faulty)
        first, second, third = mates()
        handles = [engine.submit(first, timeout_s=600), engine.submit(second, timeout_s=600)]
        await engine.step()
        faulty.down = down
        handles.append(engine.submit(third, timeout_s=600))  # arrives during the outage
        for _ in range(8):  # past the end of every trajectory
            await engine.step()
            assert not handles[2].status.finished
            if down != {"sd_random_text_encoder"}:  # the others need only the text encoder
                assert not any(h.status.finished for h in handles)
        assert engine.backend_down
        if down is True:
            assert handles[0].trajectory.steps_done == 1 and engine.iterations == 1  # paused where it was
        faulty.down = False
        await drain(engine, handles)
        assert not engine.backend_down
        assert_same_images(handles, expected)
    asyncio.run(main())


def test_a_deadline_that_passes_during_an_outage_answers_503(faulty):
    async def main():
        engine = make_engine(faulty, start_loop=True)
        faulty.down = True
        start = time.monotonic()
        handle = engine.submit(req(), timeout_s=0.6)
        await asyncio.wait_for(handle.done.wait(), timeout=5)
        waited = time.monotonic() - start
        await engine.close()
        assert handle.status == RequestStatus.FINISHED_ERROR
        assert isinstance(handle.error, BackendUnavailable) and http_status(handle.error) == 503
        assert handle.error.headers["Retry-After"] == "2"
        assert 0.6 <= waited < 1.5  # the back-off wakes up for the deadline
        assert faulty.calls.count("sd_random_text_encoder") < 10  # backed off
    asyncio.run(main())


def test_a_lasting_outage_refuses_new_requests_at_once_until_the_backend_is_back(faulty):
    """Every paused request left during the outage (deadlines): new requests are still
    refused at once (503 + Retry-After) instead of each waiting its whole deadline, and the
    loop, asking the backend itself, admits them again once it is back."""
    from types import SimpleNamespace

    from services.routers.engine_calls import submit

    ctx = SimpleNamespace(backend=SimpleNamespace(name="faulty"), charge_image_steps=lambda cost: None)

    async def main():
        engine = make_engine(faulty, start_loop=True)
        faulty.down = True
        lost = engine.submit(req(), timeout_s=0.5)
        paused = engine.submit(req(), timeout_s=0.5)
        await asyncio.sleep(0.2)
        assert engine.backend_down  # requests paused in flight
        await asyncio.wait_for(asyncio.gather(lost.done.wait(), paused.done.wait()), timeout=5)
        assert not engine.scheduler.requests
        for _ in range(3):  # the queue is empty and the outage lasts: refused at once, every time
            start = time.monotonic()
            with pytest.raises(BackendUnavailable) as refused:
                submit(ctx, engine, req(), timeout_s=30)
            assert time.monotonic() - start < 0.05 and refused.value.headers["Retry-After"]
            await asyncio.sleep(0.5)
        faulty.down = False
        deadline = time.monotonic() + 5  # the back-off is at most 2 s
        while engine.backend_down and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not engine.backend_down
        handle = submit(ctx, engine, req(steps=3), timeout_s=30)
        await asyncio.wait_for(handle.done.wait(), timeout=10)
        await engine.close()
        assert handle.status == RequestStatus.FINISHED_DONE
    asyncio.run(main())


def test_a_request_submitted_during_an_outage_is_the_probe(faulty):
    """A caller that submits anyway (not through the HTTP layer) is not left waiting for the
    back-off: its request wakes the loop and runs when the backend answers."""
    async def main():
        engine = make_engine(faulty, start_loop=True)
        faulty.down = True
        lost = engine.submit(req(), timeout_s=0.3)
        await asyncio.wait_for(lost.done.wait(), timeout=5)
        faulty.down = False
        handle = engine.submit(req(steps=3), timeout_s=30)
        await asyncio.wait_for(handle.done.wait(), timeout=10)
        await engine.close()
        assert handle.status == RequestStatus.FINISHED_DONE and not engine.backend_down
    asyncio.run(main())


def test_cancel_works_during_an_outage(faulty):
    async def main():
        engine = make_engine(faulty, start_loop=True)
        handle = engine.submit(req(steps=50), timeout_s=600)
        while handle.trajectory is None or handle.trajectory.steps_done < 2:
            await asyncio.sleep(0.005)
        faulty.down = True
        await asyncio.sleep(0.7)  # into the back-off
        assert handle.status == RequestStatus.RUNNING and engine.backend_down
        engine.cancel(handle)
        await asyncio.wait_for(handle.done.wait(), timeout=0.2)
        await engine.close()
        assert handle.status == RequestStatus.FINISHED_CANCELLED and not engine.scheduler.requests
    asyncio.run(main())


def test_the_loop_recovers_by_itself_when_the_backend_returns(faulty):
    async def main():
        expected = await clean_images(faulty)
        engine = make_engine(faulty, start_loop=True)
        faulty.down = True
        handles = [engine.submit(r, timeout_s=600) for r in mates()]
        await asyncio.sleep(0.5)
        assert engine.backend_down and not any(h.status.finished for h in handles)
        faulty.down = False
        await asyncio.wait_for(asyncio.gather(*(h.done.wait() for h in handles)), timeout=10)
        await engine.close()
        assert_same_images(handles, expected)
    asyncio.run(main())


# -- Retry-After ---------------------------------------------------------------------------
def test_retry_after_is_the_measured_drain_time_from_the_first_request(faulty):
    async def main():
        engine = make_engine(faulty, max_queued_image_steps=400)
        rate = await engine.warmup()
        assert rate and engine.scheduler.steps_per_second == rate
        engine.submit(req(steps=50, num_images=8), timeout_s=600)  # 400 image-steps queued
        with pytest.raises(QueueFull) as info:
            engine.submit(req(steps=50, num_images=2), timeout_s=600)
        # Room for 100 more image-steps frees up in a quarter of the queue's drain time: its rows
        # priced by the cost model the warm-up measured (the demo: a fraction of a second).
        drain = engine.scheduler.queue_seconds()
        assert engine.cost.measured and drain > 0
        assert info.value.retry_after_s == min(60, max(1, int(np.ceil(drain * 100 / 400 - 1e-9))))
    asyncio.run(main())


def test_retry_after_without_any_measure_is_bounded(faulty):
    engine = make_engine(faulty, max_queued_image_steps=2_000)
    engine.submit(req(steps=50, num_images=40), timeout_s=600)  # 2,000 image-steps
    with pytest.raises(QueueFull) as info:
        engine.submit(req(steps=10), timeout_s=600)
    assert 1 <= info.value.retry_after_s <= 60  # it used to say 2,000 s


def test_warmup_times_every_size_in_interleaved_rounds_after_an_untimed_one(faulty):
    """The cost table's start-up measure: each ladder size once untimed (its buffers), then
    WARMUP_ROUNDS rounds over all sizes (a drift lands on every size), each size's median."""
    from services.engine.engine import WARMUP_ROUNDS

    async def main():
        engine = make_engine(faulty, max_batch_rows=8)
        faulty.calls.clear()
        rows: list[int] = []
        fault = faulty.fault

        def record(model, inputs):
            if model.endswith("_unet"):
                rows.append(len(inputs["sample"]))
            return fault(model, inputs)

        faulty.fault = record
        await engine.warmup()
        ladder = [1, 2, 4, 8]  # the warm-up request's own 2 rows are on it
        assert rows[1:] == ladder * (1 + WARMUP_ROUNDS) + [2]  # then the shallow graph's warm-up (its features)
        assert sorted(int(n) for n in engine.cost.describe()["ms_per_call"]) == ladder
        assert "sd_random_unet_shallow" in faulty.calls
    asyncio.run(main())


def test_warmup_is_skipped_when_the_backend_is_down(faulty):
    async def main():
        faulty.down = True
        engine = make_engine(faulty)
        assert await engine.warmup() is None
        assert engine.scheduler.steps_per_second > 0
    asyncio.run(main())


# -- single-call pipelines and the Triton backend ----------------------------------------
class Flaky(EchoGenerator):
    def __init__(self, failures):
        super().__init__()
        self.failures = failures

    async def _execute(self, spec, inputs):
        if self.failures:
            self.failures -= 1
            raise BackendUnavailable("Triton at x is unavailable")
        return await super()._execute(spec, inputs)


def test_gan_retries_once_after_an_outage_then_answers_503():
    async def main():
        clean = await GANPipeline(EchoGenerator(), "echo")(seed=5, num_images=3)
        once = await GANPipeline(Flaky(1), "echo", retry_pause_s=0.01)(seed=5, num_images=3)
        np.testing.assert_array_equal(once.images, clean.images)
        twice = Flaky(2)
        with pytest.raises(BackendUnavailable):
            await GANPipeline(twice, "echo", retry_pause_s=0.01)(seed=5, num_images=3)
        assert twice.failures == 0  # exactly one retry
    asyncio.run(main())


@pytest.mark.parametrize("status,message,unavailable,reconnect", [
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", True, True),
    ("StatusCode.UNAVAILABLE", "Request for unknown model: 'sd_digits_unet' has no available versions", True, False),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'sd_digits_unet' is not found", True, False),
    ("StatusCode.INTERNAL", "Request for unknown model: 'sd_digits_unet' has no available versions", True, False),
    ("StatusCode.INTERNAL", "model 'sd_digits_unet' is not ready", True, False),
    ("StatusCode.RESOURCE_EXHAUSTED", "too many requests", True, False),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", True, False),
    ("StatusCode.CANCELLED", "Locally cancelled by application!", True, False),
    ("StatusCode.INTERNAL", "onnx runtime error 2: Got invalid dimensions for input", False, False),
    ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'sample'", False, False),
    (None, "model version must be a string", False, False),
])
def test_triton_errors_are_classified(status, message, unavailable, reconnect):
    error, fresh = classify_error(InferenceServerException(message, status=status), "triton:8001", "m")
    assert isinstance(error, BackendUnavailable if unavailable else InferenceFailed)
    assert http_status(error) == (503 if unavailable else 500)
    # Triton's own words and its address go to the log (detail), never to the client.
    assert message in error.detail and "triton:8001" in str(error)
    assert message not in error.message and "triton:8001" not in error.message
    assert "triton:8001" not in str(error.body())
    assert fresh == reconnect
    if unavailable:
        assert error.headers["Retry-After"]


def test_transport_errors_are_outages_and_the_retry_uses_a_fresh_channel(random_sd):
    class DeadClient:
        closed = False

        async def infer(self, *args, **kwargs):
            raise ConnectionResetError("connection reset by peer")

        async def close(self):
            self.closed = True

    async def main():
        backend = TritonBackend(ModelRepository(random_sd[1]), "127.0.0.1:1", timeout_s=5)
        dead = backend._client = DeadClient()
        unet = next(s for s in backend.models().values() if s.name.endswith("_unet"))
        inputs = {t.name: np.zeros((1, *[d if d > 0 else 8 for d in t.dims]), t.dtype) for t in unet.inputs}
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await backend.infer(unet.name, inputs)
        assert backend._client is None  # the next call opens a fresh channel
        await backend.close()
        assert dead.closed
    asyncio.run(main())


def _slow_unet(faulty, seconds_per_row: float) -> list[int]:
    """Each U-Net call costs `seconds_per_row` per row (a real-size model on a CPU, scaled
    down); returns the list its calls' rows are recorded in."""
    rows: list[int] = []

    def slow(model, inputs):
        if model.endswith("_unet"):
            rows.append(len(inputs["sample"]))
            time.sleep(seconds_per_row * len(inputs["sample"]))

    faulty.fault = slow
    return rows


def test_warmup_stays_within_its_time_budget_in_the_first_round_too(faulty):
    """A slow denoiser: no call starts that would end past the budget, priced from the calls
    before it, so the ladder's larger sizes (2, 4, 8 rows: 4.2 s more) never run. The old
    warm-up ran every size once before looking at the clock (5.1 s here)."""
    async def main():
        engine = make_engine(faulty, max_batch_rows=8)
        rows = _slow_unet(faulty, 0.3)
        t0 = time.perf_counter()
        rate = await engine.warmup(budget_s=1.0)
        took = time.perf_counter() - t0
        # Lazy init (prices a row), then one-row calls while they fit: at most the untimed round
        # and one timed round (fewer on a loaded machine, where each call costs more than 0.3 s).
        assert set(rows) == {1} and 1 <= len(rows) <= 3
        assert took < 2.5  # the budget, one row's slack, the text encoder and the machine's noise
        assert [int(n) for n in engine.cost.describe()["ms_per_call"]] == [1]
        assert "sd_random_unet_shallow" not in faulty.calls  # its two calls would pass the budget
        assert 0 < rate <= 1 / (2 * 0.3)  # the request's own 2 rows, priced per row
    asyncio.run(main())


def test_a_first_call_over_the_budget_is_the_only_one(faulty):
    async def main():
        engine = make_engine(faulty, max_batch_rows=8)
        rows = _slow_unet(faulty, 0.6)
        await engine.warmup(budget_s=0.5)
        assert rows == [1]
        assert engine.cost.measured and [int(n) for n in engine.cost.describe()["ms_per_call"]] == [1]
    asyncio.run(main())


def test_rows_per_call_follow_the_recorded_activation_memory(random_sd):
    from services.engine.memory import ACTIVATION_BYTES_PARAMETER, engine_max_rows

    unet = ModelRepository(random_sd[1]).models["sd_random_unet"]
    row = int(unet.parameters[ACTIVATION_BYTES_PARAMETER])
    assert row > 0 and unet.max_batch_size == 16
    assert engine_max_rows(unet, available=2 * 5 * row) == 5  # half the available memory: 5 rows
    assert engine_max_rows(unet, available=row) == 1  # always one
    assert engine_max_rows(unet, available=1000 * row) == 16  # never past the config's max
    older = type(unet)(**{**unet.__dict__, "parameters": {}})  # exported before rows were recorded
    assert engine_max_rows(older, available=row) == 16
