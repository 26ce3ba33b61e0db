"""The engine loop: schedule -> execute -> update, for one diffusion pipeline.

Requests submit and await; the loop (one asyncio task) owns every model call of the
pipeline, batching across requests at each stage:
  1. prompt encoding   all newly admitted requests' uncached prompts, one text-encoder call
  2. denoising         one U-Net call per iteration for the scheduled requests
  3. decoding          all requests whose steps are done, one VAE call per shape
Cancellation and deadlines take effect between iterations, so a cancelled request
costs at most the step already in flight.

Overlap (vLLM v1's engine-core shape; EngineConfig.overlap, which the service's
GENSERVE_ENGINE_OVERLAP=auto turns on where the denoiser runs off the worker's cores): the
next U-Net call starts as soon as the last one's outputs are applied (guidance, scheduler
steps, who is done), on requests scheduled while it ran, and everything else runs while it
executes: the previews and decodes of requests the last call finished, the text encoding of
new requests (as they arrive: the next call takes them on, `StepScheduler.join_late`), and
the event loop's other tasks (HTTP, PNG encoding, streams). Without it (and in `step()`,
which tests drive) the stages run one after another. Images are the same either way: a
request's arithmetic does not depend on which calls it shares.

Failures stay with their owner:
  - whatever one request does (bad parameters, an init image that fails to encode, an
    exception in its own scheduler step, NaN latents, a decode that fails) finishes that
    request with FINISHED_ERROR; a failed shared call (text encoder, U-Net, VAE) is
    split up and retried, so a request that poisons it fails alone;
  - a backend outage (BackendUnavailable) is nobody's fault: the requests of the stage
    that hit it stay where they are (a trajectory keeps its step; nothing is recomputed)
    and resume when the backend is back. The loop backs off (0.25 s doubling to 2 s)
    while cancellations and deadlines still take effect; a deadline that passes during
    the outage answers BackendUnavailable (503), not a timeout. Until the backend answers
    again, new requests are refused at once (`backend_down`); with no request left to
    retry, the loop asks the backend's readiness itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from services.engine.cost_model import CostModel, row_ladder
from services.engine.prompt_cache import PromptCache
from services.engine.request import FINISH_REASONS, EngineRequest, RequestStatus
from services.engine.scheduler import StepBatch, StepScheduler
from services.errors import BackendUnavailable, NonFiniteOutput
from services.pipelines.diffusion import (
    DEEP_FEATURES,
    DiffusionOutput,
    DiffusionPipeline,
    DiffusionRequest,
    denoising_steps,
    merge_rows,
)
from services.pipelines.diffusion_checks import check_cache_interval, check_denoising_steps, check_scheduler
from services.runtime.base import latency_first

if TYPE_CHECKING:
    from services.config import EngineSettings

log = logging.getLogger("genserve.engine")

T = TypeVar("T")
BACKOFF_MIN_S = 0.25  # first pause after an outage; doubles per failed try
BACKOFF_MAX_S = 2.0
# Start-up timing of the denoiser by batch rows: no call starts that would end past this many
# seconds (priced from the calls timed before it); sizes not timed are learned from live calls.
COST_MEASURE_BUDGET_S = 20.0
WARMUP_ROUNDS = 7  # timed calls per batch size at start-up, within the budget
# After the shallow U-Net (DeepCache) meets an outage, requests that cache run full steps for
# this long before it is tried again.
SHALLOW_RETRY_S = 30.0


class EngineObserver(Protocol):
    """What the engine reports as it runs (services.metrics satisfies it, without importing it)."""

    def iteration(self, model: str, rows: int, requests: int, images: int) -> None: ...
    def cost(self, model: str, table: dict) -> None: ...  # the cost model's describe(), when it changes
    def queue(self, model: str, requests: int, image_steps: int) -> None: ...
    def finished(self, model: str, reason: str) -> None: ...
    def first_step(self, model: str, seconds: float) -> None: ...  # arrival to the end of its first step


class NoObserver:
    """Ignores everything: engines built without metrics."""

    def iteration(self, model: str, rows: int, requests: int, images: int) -> None:
        pass

    def cost(self, model: str, table: dict) -> None:
        pass

    def queue(self, model: str, requests: int, image_steps: int) -> None:
        pass

    def finished(self, model: str, reason: str) -> None:
        pass

    def first_step(self, model: str, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class EngineConfig:
    """What bounds and orders one engine's work; the service builds it from its engine
    settings (`from_settings`), tests and benchmarks by hand."""

    max_batch_rows: int  # the most rows one denoiser call takes (the service bounds it by memory)
    max_queued_image_steps: int  # back-pressure: QueueFull past this many image-steps queued
    latency_budget_s: float = 0.0  # bounds one denoiser call in the cost model's choice of rows (0: off)
    max_queue_seconds: float = 0.0  # bounds the queue by its estimated drain time (0: off)
    # The scheduler's order: fair (deadline- and work-aware with aging, shared across tenants) or fcfs (arrival).
    policy: str = "fair"
    # Another system's batching rule (services.engine.bench_policies: benchmarks only).
    scheduler_class: type[StepScheduler] = StepScheduler
    # The background loop's shape: housekeeping while the U-Net call runs (see the module's docstring).
    overlap: bool = True

    @classmethod
    def from_settings(cls, settings: EngineSettings, max_batch_rows: int,
                      scheduler_class: type[StepScheduler] = StepScheduler,
                      denoiser_on_own_cores: bool = True) -> EngineConfig:
        """`denoiser_on_own_cores`: the backend runs the denoiser on this worker's CPU (the
        embedded backend), where GENSERVE_ENGINE_OVERLAP=auto does not overlap."""
        overlap = settings.overlap == "1" or (settings.overlap == "auto" and not denoiser_on_own_cores)
        return cls(max_batch_rows, settings.max_queued_steps, latency_budget_s=settings.step_budget_ms / 1000,
                   max_queue_seconds=settings.max_queue_seconds, policy=settings.policy,
                   scheduler_class=scheduler_class, overlap=overlap)


@dataclass
class InFlight:
    """One iteration's denoiser calls, started and not applied yet."""

    batch: StepBatch
    # -> (outputs by request, the outage that stopped a call or None): a task when overlapped
    # (it runs while the loop goes on), else the coroutine itself (awaited at once, no hop).
    outputs: Awaitable[tuple[dict, BackendUnavailable | None]]
    start: float  # perf_counter() at launch

    def cancel(self) -> None:
        if isinstance(self.outputs, asyncio.Task):
            self.outputs.cancel()


def check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        raise NonFiniteOutput(f"the model produced non-finite values (NaN or inf) in {what}; "
                              "a model or numerics problem: the same request gives the same result")


class DiffusionEngine:
    def __init__(self, pipeline: DiffusionPipeline, config: EngineConfig, prompt_cache: PromptCache | None = None,
                 observer: EngineObserver | None = None, cost: CostModel | None = None, start_loop: bool = True):
        """`cost` replaces the measured cost model (tests); `start_loop=False` leaves the loop
        to the caller (`await engine.step()`), which tests use to reason in iterations rather
        than in time."""
        self.pipeline = pipeline
        self.model = pipeline.name
        spec = pipeline.spec
        self.cost = cost or CostModel(config.max_batch_rows, config.latency_budget_s,
                                      native=(spec.native_height, spec.native_width))
        self.scheduler = config.scheduler_class(config.max_batch_rows, config.max_queued_image_steps, cost=self.cost,
                                                max_queue_seconds=config.max_queue_seconds, policy=config.policy)
        self.cache = prompt_cache if prompt_cache is not None else PromptCache(0)
        if pipeline.adapters is not None:  # what its unfinished requests hold stays in memory
            pipeline.adapters.in_use = lambda: {i for r in self.scheduler.requests for i in r.request.adapter_loads}
        self.observer = observer or NoObserver()
        self.iterations = 0  # U-Net iterations run: a step counter tests can assert on
        self.overlap = config.overlap
        self._flight: InFlight | None = None  # the overlapped loop's U-Net call in progress
        self._planned: StepBatch | None = None  # the next call's requests, scheduled while _flight runs
        self._admit_lock = asyncio.Lock()  # one admission at a time: a request is started once
        self._admissions: set[asyncio.Task] = set()  # the overlapped loop's, started by submit()
        self._previews_due: list[tuple[EngineRequest, int, np.ndarray]] = []  # (request, step, x0) to decode
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._start_loop = start_loop
        # Outage bookkeeping: the last iteration's BackendUnavailable (None: none seen), whether
        # any model call of the current iteration succeeded, and the next back-off pause.
        self._outage: BackendUnavailable | None = None
        self._step_outage: BackendUnavailable | None = None
        self._step_progress = False
        self._backoff_s = BACKOFF_MIN_S
        self._shallow_retry_at = 0.0  # DeepCache's shallow graph is not tried before (monotonic)
        self._report_queue()  # gauges exist (at 0) from start-up, before the first request

    @property
    def backend_down(self) -> bool:
        """True from an iteration that hit BackendUnavailable until the backend answers
        again: new requests would only wait, so the HTTP layer answers them 503 at once. While
        requests are paused in flight, their retries probe the backend; once none is left
        (deadlines, cancellations), the loop asks the backend itself (`is_ready`, at the
        back-off pace), so a lasting outage refuses every new request at once instead of
        letting each wait its whole deadline."""
        return self._outage is not None

    # -- client side -------------------------------------------------------------------
    def submit(self, request: DiffusionRequest, timeout_s: float, preview_every: int = 0,
               tenant: str = "") -> EngineRequest:
        """Admits a request (raises QueueFull when the step queue is full, PromptTooLong
        for a prompt that does not fit, InvalidRequest for one that would run no step or
        names adapters the pipeline cannot serve) and returns its handle; await `handle.done`."""
        self.pipeline.resolve_adapters(request)  # before tokenize: adapters are part of the texts' keys
        self.pipeline.tokenize(request)  # reject bad prompts before they queue
        rounding = self.pipeline.spec.strength_rounding
        check_denoising_steps(request.num_inference_steps, request.strength, request.init_image is not None, rounding)
        check_cache_interval(self.pipeline.spec, request.cache_interval)
        check_scheduler(request.scheduler, self.model, self.pipeline.schedulers)
        req = EngineRequest(request, deadline=time.monotonic() + timeout_s, preview_every=preview_every,
                            rows_hint=2 if self.pipeline.spec.classifier_free(request) else 1, tenant=tenant,
                            planned_steps=denoising_steps(request, rounding))
        self.scheduler.add_request(req)
        self._report_queue()
        self._ensure_running()
        if self.overlap and self._start_loop:  # encoded now, beside the call in flight: it joins the next one
            task = asyncio.get_running_loop().create_task(self._admit_now())
            self._admissions.add(task)
            task.add_done_callback(self._admissions.discard)
        self._wakeup.set()
        return req

    def cancel(self, req: EngineRequest) -> None:
        """The request leaves at the next iteration boundary (or within a back-off pause)."""
        if not req.status.finished:
            req.cancel_requested = True
            self._wakeup.set()

    async def generate(self, request: DiffusionRequest, timeout_s: float) -> DiffusionOutput:
        await self.pipeline.load_adapters(request)  # before it queues (first use pays)
        req = self.submit(request, timeout_s)
        try:
            await req.done.wait()
        finally:
            self.cancel(req)
        if req.status != RequestStatus.FINISHED_DONE or req.result is None:
            raise req.error or RuntimeError(FINISH_REASONS[req.status])
        return req.result

    async def warmup(self, budget_s: float = COST_MEASURE_BUDGET_S) -> float | None:
        """Times the denoiser at the native size for a ladder of batch rows (1, 2, 4, ... up to
        the engine's max, which the service already bounded by the rows' activation memory) and
        seeds the cost model with it, so the first iteration already runs the best size and the
        first 429 carries a real Retry-After. Bounded by `budget_s`: one call at one row always
        runs (it pays the session's lazy initialisation and prices a row); after it, a call runs
        only while its cost, priced from the rows timed so far, fits what is left of the budget,
        in the first round as in the others (a real-size U-Net on a CPU takes tens of seconds a
        row: /readyz must not wait for a ladder of them). Returns the rate at the warm-up
        request's own rows (one image with guidance), in image-steps/s, or None when skipped
        (backend down, or any failure: warm-up is an optimisation, never a reason not to start)."""
        try:
            request = self.pipeline.warmup_request()
            keys = self.pipeline.tokenize(request)
            encoded = await self.pipeline.encode_prompts(keys) if keys else []
            inputs = (await self.pipeline.start(request, encoded)).model_inputs()
            own_rows = len(next(iter(inputs.values())))
            sizes = sorted({own_rows, *row_ladder(self.scheduler.max_batch_rows)})
            sizes = [n for n in sizes if n <= self.scheduler.max_batch_rows] or [1]
            feeds = {n: {k: np.concatenate([v] * -(-n // len(v)))[:n] for k, v in inputs.items()} for n in sizes}
            t0 = time.perf_counter()
            await self.pipeline.denoise(feeds[sizes[0]])  # lazy initialisation; prices a row
            first = time.perf_counter() - t0
            spent, per_row = first, first / sizes[0]
            times: dict[int, list[float]] = {n: [] for n in sizes}

            def fits(rows: int) -> bool:
                return spent + per_row * rows <= budget_s

            # Rounds over every size, then each size's median: one untimed round first (a batch
            # size's first call allocates its buffers), and sizes interleaved so that a drift
            # (clock ramp-up, a neighbour's job) lands on all of them. Measured on this CPU:
            # two calls per size in a row gave tables that put the best size anywhere from 2
            # to 16 rows from one start to the next.
            for round_ in range(1 + WARMUP_ROUNDS):
                ran = False
                for n in sizes:
                    if not fits(n):
                        continue
                    t0 = time.perf_counter()
                    await self.pipeline.denoise(feeds[n])
                    took = time.perf_counter() - t0
                    spent, per_row, ran = spent + took, took / n, True
                    if round_:
                        times[n].append(took)
                if not ran:
                    break
            # Nothing timed after the first call (it alone used the budget): that call prices the rows.
            table = {n: float(np.median(t)) for n, t in times.items() if t} or {sizes[0]: first}
        except Exception as exc:
            log.warning("engine %s: warm-up skipped (%s: %s)", self.model, type(exc).__name__, exc)
            return None
        self.cost.seed(self.cost.native, table)
        if spent + 2 * per_row * own_rows <= budget_s:  # a full call that keeps features, a shallow one
            await self._warm_shallow(inputs)
        elif self.pipeline.spec.shallow_denoiser is not None:
            log.info("engine %s: shallow U-Net not warmed (over the %.0f s warm-up budget)", self.model, budget_s)
        smallest = min(table)
        own = table.get(own_rows) or table[smallest] / smallest * own_rows
        rate = 1.0 / max(own, 1e-6)  # one image-step per call
        self.scheduler.seed_rate(rate)
        described = self.cost.describe()
        self.observer.cost(self.model, described)
        log.info("engine %s: warm-up %.1f s; denoiser ms per call by rows %s -> best %d rows (%.1f rows/s)",
                 self.model, spent, described["ms_per_call"], described["best_rows"], described["rows_per_second"])
        return rate

    async def _warm_shallow(self, inputs: dict[str, np.ndarray]) -> None:
        """One call of DeepCache's shallow graph, so its lazy initialisation is not paid inside
        the first request that caches. A failure here is logged, never fatal."""
        if self.pipeline.spec.shallow_denoiser is None:
            return
        try:
            _, features = await self.pipeline.denoise(inputs, keep_features=True)
            if features is None:
                raise ValueError("the full U-Net returned no deep features")
            await self.pipeline.denoise({**inputs, DEEP_FEATURES: features})
        except Exception as exc:
            log.warning("engine %s: shallow U-Net warm-up failed (%s: %s)", self.model, type(exc).__name__, exc)

    async def close(self) -> None:
        for task in list(self._admissions):
            task.cancel()
        if self._flight is not None:
            self._flight.cancel()
            self._flight = None
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None

    # -- the loop ------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._start_loop and (self._loop_task is None or self._loop_task.done()):
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=f"engine-{self.model}")

    async def _run(self) -> None:
        while True:
            try:
                worked = await (self._overlapped_iteration() if self.overlap else self.step())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an engine bug (model failures fail their own requests)
                log.exception("engine %s iteration failed", self.model)
                if self._flight is not None:
                    self._flight.cancel()
                    self._flight = None
                for r in list(self.scheduler.requests):
                    self._fail(r, exc)
                self.scheduler.prune()
                worked = True
            self._report_queue()
            if self._step_outage is not None and not self._step_progress and self.scheduler.requests:
                await self._back_off()
            elif not worked:
                self._wakeup.clear()
                if not self.scheduler.requests and self._outage is not None:
                    await self._probe()
                elif not self.scheduler.requests:
                    await self._wakeup.wait()
                else:  # only waiting on deadlines
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=0.05)
                    except TimeoutError:
                        pass

    async def step(self) -> bool:
        """One iteration, stage after stage; returns whether anything ran (or was tried, in
        an outage). Tests drive this by hand; the background loop runs it without overlap.

        Each stage stands alone: when the backend is unavailable for one, its requests
        stay where they are and the next stages still run (a model reloading on Triton
        stalls only the requests that need it)."""
        self._step_outage, self._step_progress = None, False
        self._finish_leaving()  # 1. cancellations and deadlines
        # Serving one request, its calls have nothing to overlap: the embedded backend may run
        # them on this thread (measured at concurrency 1: half the non-model time per step).
        with latency_first(len(self.scheduler.requests) == 1):
            worked = await self._stage(self._admit)  # 2. prompts
            worked = await self._stage(self._denoise) or worked  # 3. one U-Net step
            worked = await self._stage(self._previews) or worked
            worked = await self._stage(self._decode) or worked  # 4. VAE
        self._note_outage()
        return worked

    async def _overlapped_iteration(self) -> bool:
        """One iteration of the overlapped loop: the last call's outputs applied, the next
        call started at once, then the rest while it runs (see the module's docstring)."""
        self._step_outage, self._step_progress = None, False
        worked = False
        with latency_first(len(self.scheduler.requests) == 1):
            if self._flight is not None:
                flight, self._flight = self._flight, None
                worked = await self._stage(lambda: self._land(flight), yield_after=False)
            self._finish_leaving()
            planned, self._planned = self._planned, None
            if self._step_outage is None or self._step_progress:  # after an outage, _run backs off first
                self._flight = self._launch(planned, overlap=True)
                worked = worked or self._flight is not None
            await asyncio.sleep(0)  # the call starts; the loop's other tasks run beside it
            for stage in (self._previews, self._decode, self._admit):
                worked = await self._stage(stage) or worked
            if self._flight is not None:  # the next call's requests, while this one runs
                self._planned = self.scheduler.schedule(ahead=set(self._flight.batch.requests))
        self._note_outage()
        return worked

    async def _stage(self, stage, yield_after: bool = True) -> bool:
        """Runs one stage: an outage pauses its requests (they stay where they are; _run backs
        off and a later iteration retries), never fails them."""
        try:
            worked = await stage()
        except BackendUnavailable:
            worked = True
        self.scheduler.prune()
        if yield_after:
            # A stage whose calls ran inline never suspended: the loop's other tasks (reading
            # the next request, answering finished ones) get their turn between stages.
            await asyncio.sleep(0)
        return worked

    def _note_outage(self) -> None:
        if self._step_outage is not None:
            if self._outage is None:
                log.warning("engine %s: backend unavailable, pausing the requests that need it: %s",
                            self.model, self._step_outage)
            self._outage = self._step_outage
        elif self._step_progress:
            if self._outage is not None:
                log.info("engine %s: backend answers again, resuming", self.model)
            self._outage, self._backoff_s = None, BACKOFF_MIN_S

    async def _back_off(self) -> None:
        """Nothing could run: waits before the next try (0.25 s doubling to 2 s), waking
        for cancellations and deadlines, which still take effect during an outage."""
        until = time.monotonic() + self._backoff_s
        self._backoff_s = min(2 * self._backoff_s, BACKOFF_MAX_S)
        while self.scheduler.requests and (now := time.monotonic()) < until:
            self._wakeup.clear()
            next_deadline = min(r.deadline for r in self.scheduler.requests)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, min(until, next_deadline + 1e-3) - now))
            except TimeoutError:
                pass
            self._finish_leaving()
            self._report_queue()

    async def _probe(self) -> None:
        """Known down with nothing in flight: waits the back-off (a submitted request wakes
        it: that request is the probe), then asks the backend whether it is back."""
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=self._backoff_s)
            return
        except TimeoutError:
            pass
        self._backoff_s = min(2 * self._backoff_s, BACKOFF_MAX_S)
        try:
            ready = await self.pipeline.backend.is_ready()
        except Exception:
            ready = False
        if ready and not self.scheduler.requests:
            log.info("engine %s: backend ready again, admitting requests", self.model)
            self._outage, self._backoff_s = None, BACKOFF_MIN_S

    async def _backend(self, call: Awaitable[T]) -> T:
        """Every model call of the loop goes through here, to record outages and recovery."""
        try:
            result = await call
        except BackendUnavailable as exc:
            self._step_outage = exc
            raise
        self._step_progress = True
        return result

    def _finish_leaving(self) -> None:
        for r in self.scheduler.finish_requests(outage=self._outage):
            self.observer.finished(self.model, FINISH_REASONS[r.status])

    def _fail(self, r: EngineRequest, exc: BaseException) -> None:
        """Finishes one request with its own error; everyone else goes on."""
        if r.status.finished:
            return
        log.warning("engine %s: request %d failed: %s: %s", self.model, r.id, type(exc).__name__, exc)
        r.finish(RequestStatus.FINISHED_ERROR, exc)
        self.observer.finished(self.model, "error")

    # -- stage 2: admission --------------------------------------------------------------
    async def _admit_now(self) -> None:
        """The overlapped loop admits a request as it arrives (its prompt encoded beside the
        U-Net call in flight), so that the next call takes its first step; the loop's own
        admission stage catches anything left (after an outage, its back-off paces the retries)."""
        if self._outage is not None:
            return
        try:
            await self._admit()
            self.scheduler.prune()
        except BackendUnavailable:
            pass  # recorded by _backend: the loop pauses and retries
        except Exception as exc:  # an engine bug: the waiting requests fail, the loop goes on
            log.exception("engine %s: admission failed", self.model)
            for r in list(self.scheduler.requests):
                if r.status == RequestStatus.WAITING:
                    self._fail(r, exc)

    async def _admit(self) -> bool:
        """Encodes every waiting request's prompts and starts its trajectory."""
        async with self._admit_lock:
            return await self._admit_waiting()

    async def _admit_waiting(self) -> bool:
        waiting = [r for r in self.scheduler.requests if r.status == RequestStatus.WAITING]
        if not waiting:
            return False
        start = time.perf_counter()
        embeddings = await self._prompt_embeddings(waiting)
        encode_seconds = time.perf_counter() - start
        for r in waiting:
            if r.status.finished:
                continue
            r.timings["text_encoding_seconds"] = encode_seconds
            t0 = time.perf_counter()
            try:
                r.trajectory = await self._backend(self.pipeline.start(r.request, embeddings[r.id]))
            except BackendUnavailable:
                raise  # stays WAITING; start() draws from fresh generators, so a retry is exact
            except Exception as exc:  # e.g. its init image failed to encode: only this request fails
                self._fail(r, exc)
                continue
            r.timings["latent_preparation_seconds"] = time.perf_counter() - t0
            r.timings["denoising_seconds"] = 0.0
            r.status = RequestStatus.RUNNING
        return True

    async def _prompt_embeddings(self, waiting: list[EngineRequest]) -> dict[int, list]:
        """Each request's embeddings, [negative, positive] or [positive]: cache first, the
        misses of all requests in one text-encoder call. If that call fails (not an
        outage), each request is encoded alone, so a prompt that breaks it fails alone."""
        ids = {r.id: self.pipeline.tokenize(r.request) for r in waiting}
        try:
            found = await self._encode([x for r in waiting for x in ids[r.id]])
        except BackendUnavailable:
            raise
        except Exception as exc:
            if len(waiting) == 1:
                self._fail(waiting[0], exc)
                return {}
            found = {}
            for r in waiting:
                try:
                    found.update(await self._encode(ids[r.id]))
                except BackendUnavailable:
                    raise
                except Exception as own:
                    self._fail(r, own)
        return {r.id: [found[x.tobytes()] for x in ids[r.id]] for r in waiting if not r.status.finished}

    async def _encode(self, token_ids: list[np.ndarray]) -> dict[bytes, object]:
        found: dict[bytes, object] = {}
        misses: dict[bytes, np.ndarray] = {}
        for x in token_ids:
            key = x.tobytes()
            if key in found or key in misses:
                continue
            hit = self.cache.get(self.model, x)
            if hit is None:
                misses[key] = x
            else:
                found[key] = hit
        if misses:
            embeddings = await self._backend(self.pipeline.encode_prompts(list(misses.values())))
            unconditional = self.pipeline.empty_prompt_key
            for (key, x), e in zip(misses.items(), embeddings):
                found[key] = e
                self.cache.put(self.model, x, e, pin=unconditional is not None and np.array_equal(x, unconditional))
        return found

    # -- stage 3: one denoising step -----------------------------------------------------
    async def _denoise(self) -> bool:
        """One U-Net call for every scheduled request, then each advances its own state."""
        flight = self._launch()
        return flight is not None and await self._land(flight)

    def _launch(self, planned: StepBatch | None = None, overlap: bool = False) -> InFlight | None:
        """Builds the inputs of a batch (`planned` while the last call ran, else scheduled now)
        and its calls; `overlap`: they start now, as a task of their own. A planned request
        that left or failed since is dropped from it."""
        batch = StepBatch()
        if planned is not None:
            batch.requests = [r for r in planned.requests if self.scheduler.runs_next(r)]
            batch.rows = sum(r.started.rows for r in batch.requests)
            batch = self.scheduler.join_late(batch)  # requests admitted since the plan
        if not batch.requests:
            batch = self.scheduler.schedule()
        if not batch.requests:
            return None
        start = time.perf_counter()
        shallow_ok = time.monotonic() >= self._shallow_retry_at
        # Each request's rows; one whose inputs cannot be built fails alone.
        inputs: dict[EngineRequest, dict[str, np.ndarray]] = {}
        for r in batch.requests:
            try:
                if not shallow_ok:  # the shallow graph is unavailable: a full (exact) step instead
                    r.started.deep_features = None
                inputs[r] = r.started.model_inputs()
            except Exception as exc:  # e.g. no timestep left to run
                self._fail(r, exc)
        calls = self._calls(inputs)
        return InFlight(batch, asyncio.get_running_loop().create_task(calls) if overlap else calls, start)

    async def _calls(self, inputs: dict[EngineRequest, dict[str, np.ndarray]]):
        """The shared calls: full rows, then shallow ones (DeepCache). A call that meets an
        outage leaves its trajectories untouched; after a full call's outage the shallow one
        is not tried."""
        full = [r for r in inputs if DEEP_FEATURES not in inputs[r]]
        shallow = [r for r in inputs if DEEP_FEATURES in inputs[r]]
        outputs, outage = {}, None
        try:
            outputs.update(await self._unet(full, inputs))
        except BackendUnavailable as exc:
            outage = exc
        if shallow and outage is None:
            try:
                outputs.update(await self._unet(shallow, inputs, record_outage=False))
            except BackendUnavailable as exc:
                # The shallow graph alone is down (not loaded, reloading): its requests lose
                # their cache and run full steps for a while. Nobody's request is held up, and
                # the model is not reported down while its full graph answers.
                log.warning("engine %s: shallow U-Net unavailable (%s); DeepCache requests run full steps "
                            "for %.0f s", self.model, exc, SHALLOW_RETRY_S)
                self._shallow_retry_at = time.monotonic() + SHALLOW_RETRY_S
                for r in shallow:
                    if r.trajectory is not None:
                        r.trajectory.deep_features = None
        return outputs, outage

    async def _land(self, flight: InFlight) -> bool:
        """Applies a call's outputs: guidance and the scheduler step per request (non-finite
        latents fail their request), who is done, progress events; previews are queued for
        the previews stage. A request that finished while the call ran (cancelled, failed)
        is skipped."""
        outputs, outage = await flight.outputs
        if outage is not None and not outputs:
            raise outage
        seconds = time.perf_counter() - flight.start
        self.iterations += 1
        outputs = {r: out for r, out in outputs.items() if not r.status.finished}
        advanced = StepBatch([r for r in flight.batch.requests if r in outputs],
                             sum(r.started.rows for r in outputs))
        for r, (noise_pred, features) in outputs.items():
            try:
                r.started.advance(noise_pred, features)
                check_finite(r.started.latents, f"the latents after step {r.started.steps_done}")
            except Exception as exc:
                self._fail(r, exc)
                continue
            r.timings["denoising_seconds"] += time.perf_counter() - flight.start
        self.scheduler.update_from_output(advanced, seconds)
        self.observer.iteration(self.model, advanced.rows, len(advanced.requests),
                                sum(r.request.num_images for r in advanced.requests))
        for r in advanced.requests:
            if r.status.finished:
                continue
            t = r.started
            if t.steps_done == 1:
                self.observer.first_step(self.model, time.monotonic() - r.arrival)
            r.emit("progress", step=t.steps_done, total=t.num_steps, elapsed=round(time.monotonic() - r.arrival, 6))
            if (r.preview_every and not t.done and t.steps_done % r.preview_every == 0
                    and t.pred_original_sample is not None):
                self._previews_due.append((r, t.steps_done, t.pred_original_sample))
        if outage is not None:
            raise outage
        return True

    async def _unet(self, requests: list[EngineRequest], inputs: dict[EngineRequest, dict[str, np.ndarray]],
                    record_outage: bool = True) -> dict[EngineRequest, tuple[np.ndarray, np.ndarray | None]]:
        """(noise_pred, deep features or None) per request from one U-Net call (the full graph,
        or the shallow one for rows that carry deep features). A call that fails for a reason
        other than an outage is bisected: each half is retried, so a request that poisons the
        call fails alone (about 2 log2(n) extra calls) and its batch-mates get their step.
        `record_outage=False`: an outage is the caller's to handle (not the engine's state)."""
        if not requests:
            return {}
        merged = merge_rows([inputs[r] for r in requests])  # rows without control get zero control inputs
        # Read before the call: a request may finish (cancelled, failed) while it runs.
        caching = {r: r.started.caching for r in requests}
        keep = any(caching.values())  # the full graph's features, for requests that cache
        try:
            t0 = time.perf_counter()
            call = self.pipeline.denoise(merged, keep)
            noise_pred, features = await (self._backend(call) if record_outage else call)
            if DEEP_FEATURES not in merged:  # the cost model prices full calls
                self._observe_cost(requests[0].shape, len(next(iter(merged.values()))), time.perf_counter() - t0)
        except BackendUnavailable:
            raise
        except Exception as exc:
            if len(requests) == 1:
                self._fail(requests[0], exc)
                return {}
            log.warning("engine %s: U-Net call for %d requests failed (%s); retrying in halves",
                        self.model, len(requests), exc)
            half = len(requests) // 2
            return {**await self._unet(requests[:half], inputs, record_outage),
                    **await self._unet(requests[half:], inputs, record_outage)}
        offset, result = 0, {}
        for r in requests:
            n = len(next(iter(inputs[r].values())))
            rows = slice(offset, offset + n)
            # A caching request keeps a copy of its own rows: a view would keep the whole call's
            # features (every row of it, [rows, C_f, h, w]) alive until its next full step.
            own = features[rows].copy() if features is not None and caching[r] else None
            result[r] = (noise_pred[rows], own)
            offset += n
        return result

    def _observe_cost(self, bucket, rows: int, seconds: float) -> None:
        """A live denoiser call refreshes the cost model (reported every 50 iterations)."""
        self.cost.observe(bucket, rows, seconds)
        if self.iterations % 50 == 0:
            self.observer.cost(self.model, self.cost.describe())

    async def _previews(self) -> bool:
        """The x0 estimates queued by the last call, decoded for streaming clients (every
        `preview_every` steps). A preview that fails fails its request; one that meets an
        outage is skipped."""
        due, self._previews_due = self._previews_due, []
        for r, step, x0 in due:
            if r.status.finished or r.trajectory is None:
                continue
            try:
                images = await self._backend(self.pipeline.decode(r.trajectory.decoder_input(x0)))
            except BackendUnavailable:
                return True
            except Exception as exc:
                self._fail(r, exc)
                continue
            r.emit("preview", step=step, images=images)
        return bool(due)

    # -- stage 4: decoding ---------------------------------------------------------------
    async def _decode(self) -> bool:
        """Decodes every request whose steps are done (this iteration's, and any an outage
        held back): one VAE call per shape. If a group's call fails (not an outage), each
        request is decoded alone, so only the one that breaks it fails."""
        decoding = [r for r in self.scheduler.requests if r.status == RequestStatus.DECODING]
        if not decoding:
            return False
        by_shape: dict[tuple, list[EngineRequest]] = {}
        for r in decoding:
            by_shape.setdefault(r.shape, []).append(r)
        for group in by_shape.values():
            start = time.perf_counter()
            latents = {}
            for r in group:
                try:
                    latents[r] = r.started.decoder_input()
                except Exception as exc:
                    self._fail(r, exc)
            group = list(latents)
            if not group:
                continue
            try:
                images = await self._backend(self.pipeline.decode(np.concatenate([latents[r] for r in group])))
                offsets = np.cumsum([0] + [r.request.num_images for r in group])
                parts = {r: images[a:b] for r, a, b in zip(group, offsets[:-1], offsets[1:])}
            except BackendUnavailable:
                raise  # the group stays DECODING; the next iteration decodes it
            except Exception as exc:
                if len(group) == 1:
                    self._fail(group[0], exc)
                    continue
                parts = await self._decode_alone(group, latents)
            seconds = time.perf_counter() - start
            for r, images in parts.items():
                self._complete(r, images, seconds)
        return True

    async def _decode_alone(self, group: list[EngineRequest], latents: dict) -> dict[EngineRequest, np.ndarray]:
        parts = {}
        for r in group:
            try:
                parts[r] = await self._backend(self.pipeline.decode(latents[r]))
            except BackendUnavailable:
                for done, images in parts.items():  # keep what was decoded before the outage
                    self._complete(done, images, 0.0)
                raise
            except Exception as exc:
                self._fail(r, exc)
        return parts

    def _complete(self, r: EngineRequest, images: np.ndarray, seconds: float) -> None:
        try:
            check_finite(images, "the decoded images")
        except NonFiniteOutput as exc:
            self._fail(r, exc)
            return
        n = r.request.num_images
        r.timings["decoding_seconds"] = seconds
        r.result = DiffusionOutput(images, [r.request.seed + i for i in range(n)], dict(r.timings))
        r.finish(RequestStatus.FINISHED_DONE)
        self.observer.finished(self.model, "done")

    def _report_queue(self) -> None:
        self.observer.queue(self.model, len(self.scheduler.requests), self.scheduler.queued_image_steps)
