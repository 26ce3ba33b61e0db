"""The step-level engine: batch invariance, join/leave, cancellation, deadlines, back-pressure."""

import asyncio
import itertools

import pytest

from services.engine.cost_model import CostModel
from services.engine.engine import DiffusionEngine, EngineConfig
from services.engine.prompt_cache import PromptCache
from services.engine.request import RequestStatus
from services.engine.scheduler import QueueFull
from services.pipelines.pipeline_stable_diffusion import (
    DiffusionRequest,
    StableDiffusionPipeline,
    discover_stable_diffusion,
)
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.engine import drain
from tests.fixtures.images import psnr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(random_sd):
    _, repo = random_sd
    backend = OnnxRuntimeBackend(ModelRepository(repo))
    return StableDiffusionPipeline(backend, discover_stable_diffusion(backend.models())["sd_random"])


def req(prompt="a photo of a red cat", steps=6, guidance=4.0, seed=0, height=16, width=16, **kw) -> DiffusionRequest:
    return DiffusionRequest(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                            height=height, width=width, **kw)


def test_an_image_is_the_same_alone_or_among_seven_others(pipeline):
    async def main():
        alone = await pipeline(req(scheduler="euler_ancestral", seed=42, num_images=2))
        engine = DiffusionEngine(pipeline, EngineConfig(32, 10_000), start_loop=False)
        others = [engine.submit(req(prompt=p, steps=s, guidance=g, seed=i, scheduler=sch), timeout_s=600)
                  for i, (p, s, g, sch) in enumerate([
                      ("the big blue number", 4, 1.0, "ddim"), ("a small digit", 9, 7.5, "euler"),
                      ("a cat", 3, 2.0, "dpmpp_2m"), ("blue", 6, 4.0, "ddpm"), ("red", 5, 0.0, "ddim"),
                      ("a photo", 8, 3.0, "euler_ancestral"), ("big cat", 7, 5.0, "euler")])]
        mine = engine.submit(req(scheduler="euler_ancestral", seed=42, num_images=2), timeout_s=600)
        await drain(engine, [mine, *others])
        assert mine.status == RequestStatus.FINISHED_DONE
        return alone.images, mine.result.images
    alone, batched = asyncio.run(main())
    assert psnr(alone, batched, peak=2.0) >= 50  # images in [-1, 1]


def as_many_as_fit(rows=16):
    """A cost model that never learns: every iteration takes all the rows that fit (tests
    counting iterations must not depend on how fast this machine ran a call)."""
    return CostModel(rows, learn=False)


def test_a_short_request_joins_and_leaves_before_a_long_one(pipeline):
    async def main():
        engine = DiffusionEngine(pipeline, EngineConfig(16, 10_000), start_loop=False,
                                 cost=as_many_as_fit())
        long = engine.submit(req(steps=50, seed=1), timeout_s=600)
        for _ in range(3):
            await engine.step()
        short = engine.submit(req(steps=5, seed=2), timeout_s=600)
        order = []
        while not long.status.finished:
            await engine.step()
            for h in (short, long):
                if h.status.finished and h not in order:
                    order.append(h)
        assert order == [short, long]
        assert engine.iterations == 50  # the short one never cost an iteration of its own
    asyncio.run(main())


def test_a_cancelled_request_leaves_within_one_step(pipeline):
    async def main():
        engine = DiffusionEngine(pipeline, EngineConfig(16, 10_000), start_loop=False)
        keep = engine.submit(req(steps=20, seed=1), timeout_s=600)
        gone = engine.submit(req(steps=20, seed=2), timeout_s=600)
        for _ in range(4):
            await engine.step()
        engine.cancel(gone)
        before = engine.iterations
        await engine.step()
        assert gone.status == RequestStatus.FINISHED_CANCELLED
        assert gone not in engine.scheduler.requests and gone.trajectory is None
        assert engine.iterations - before <= 1
        assert engine.scheduler.schedule().requests == [keep]
    asyncio.run(main())


def test_a_full_queue_refuses_at_once_with_a_retry_hint(pipeline):
    async def main():
        engine = DiffusionEngine(pipeline, EngineConfig(16, 30), start_loop=False)
        engine.submit(req(steps=20, num_images=1), timeout_s=600)
        with pytest.raises(QueueFull) as info:
            engine.submit(req(steps=20, num_images=1), timeout_s=600)
        assert info.value.retry_after_s >= 1 and info.value.limit == 30
        engine.submit(req(steps=10), timeout_s=600)  # what fits is still admitted
    asyncio.run(main())


def test_deadline_passes_and_the_request_times_out(pipeline):
    async def main():
        engine = DiffusionEngine(pipeline, EngineConfig(16, 10_000), start_loop=False)
        late = engine.submit(req(steps=50), timeout_s=0.0)
        await engine.step()
        assert late.status == RequestStatus.FINISHED_TIMEOUT and engine.iterations == 0
    asyncio.run(main())


def test_prompt_cache_hits_and_the_unconditional_embedding_is_pinned(pipeline):
    lookups = []
    cache = PromptCache(capacity=1, on_lookup=lambda model, hit: lookups.append(hit))

    async def main():
        engine = DiffusionEngine(pipeline, EngineConfig(16, 10_000),
                                 prompt_cache=cache, start_loop=False)
        for prompt in ["a photo of a red cat", "a small digit", "a small digit"]:
            h = engine.submit(req(prompt=prompt, steps=2), timeout_s=600)
            await drain(engine, [h])
    asyncio.run(main())
    # (uncond, prompt) per request: miss miss | hit(pinned "") miss | hit hit
    assert lookups == [False, False, True, False, True, True]


def test_the_background_loop_serves_concurrent_callers(pipeline):
    async def main():
        engine = DiffusionEngine(pipeline, EngineConfig(16, 10_000), cost=as_many_as_fit())
        outs = await asyncio.gather(*(engine.generate(req(steps=s, seed=s), timeout_s=600) for s in (3, 6, 9)))
        await engine.close()
        return outs, engine.iterations
    outs, iterations = asyncio.run(main())
    assert [o.seeds for o in outs] == [[3], [6], [9]] and iterations < 3 + 6 + 9


def test_a_long_request_keeps_moving_among_a_stream_of_short_ones(pipeline):
    """The fair policy's progress guarantee: with many clients keeping short requests coming,
    a long request still steps at least once every MAX_STEP_GAP + S iterations (S: the
    requests already waiting longer than it; here the short ones rarely wait at all). Before,
    its virtual deadline (arrival + STRETCH x its remaining work) let every short request that
    arrived in the next ~24 s pass it: at 100 clients, a minute between its steps."""
    from services.engine.scheduler import MAX_STEP_GAP

    async def main():
        cost = CostModel(16, native=(16, 16), learn=False)
        cost.seed((16, 16), {1: 0.01, 2: 0.015, 4: 0.025, 8: 0.05, 16: 0.2}, now=0.0)  # best: 8 rows
        engine = DiffusionEngine(pipeline, EngineConfig(16, 100_000), start_loop=False,
                                 cost=cost)
        long = engine.submit(req(steps=60, seed=1), timeout_s=600)
        await engine.step()
        shorts, turns, seed = [], [], 2
        for _ in range(150):  # two new short requests every iteration: 4+ rows wanted, 8 run
            for _ in range(2):
                shorts.append(engine.submit(req(steps=4, seed=seed), timeout_s=600))
                seed += 1
            before = long.trajectory.steps_done
            await engine.step()
            if long.trajectory.steps_done > before:
                turns.append(engine.iterations)
        gaps = [b - a for a, b in itertools.pairwise(turns)]
        assert len(turns) >= 150 // (2 * MAX_STEP_GAP), f"the long request stepped {len(turns)} times in 150"
        assert max(gaps) <= 2 * MAX_STEP_GAP, f"gaps between its steps: {gaps}"
        # The short ones still flow (overloaded: 16 rows wanted an iteration, 8 run).
        assert sum(s.status == RequestStatus.FINISHED_DONE for s in shorts) > 40
    asyncio.run(main())
