"""The engine loop: schedule -> execute -> update, for one diffusion pipeline.

Requests submit and await; the loop (one asyncio task) owns every model call of the
pipeline, batching across requests at each stage:
  1. prompt encoding   all newly admitted requests' uncached prompts, one text-encoder call
  2. denoising         one U-Net call per iteration for the scheduled requests
  3. decoding          all requests that finished this iteration, one VAE call per shape
Cancellation and deadlines take effect between iterations, so a cancelled request
costs at most the step already in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from services.engine.prompt_cache import PromptCache
from services.engine.request import FINISH_REASONS, EngineRequest, RequestStatus
from services.engine.scheduler import StepBatch, StepScheduler
from services.pipelines.pipeline_stable_diffusion import DiffusionOutput, DiffusionRequest, StableDiffusionPipeline

log = logging.getLogger("genserve.engine")


class EngineObserver:
    """Hooks for metrics; the default does nothing."""

    def iteration(self, model: str, rows: int, requests: int, images: int) -> None: ...
    def queue(self, model: str, requests: int, image_steps: int) -> None: ...
    def finished(self, model: str, reason: str) -> None: ...


class DiffusionEngine:
    def __init__(self, pipeline: StableDiffusionPipeline, max_batch_rows: int, max_queued_image_steps: int,
                 prompt_cache: PromptCache | None = None, observer: EngineObserver | None = None,
                 start_loop: bool = True):
        """`start_loop=False` leaves the loop to the caller (`await engine.step()`), which
        tests use to reason in iterations rather than in time."""
        self.pipeline = pipeline
        self.model = pipeline.models.name
        self.scheduler = StepScheduler(max_batch_rows, max_queued_image_steps)
        self.cache = prompt_cache if prompt_cache is not None else PromptCache(0)
        self.observer = observer or EngineObserver()
        self.iterations = 0  # U-Net iterations run: a step counter tests can assert on
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._start_loop = start_loop
        self._report_queue()  # gauges exist (at 0) from start-up, before the first request

    # -- client side -------------------------------------------------------------------
    def submit(self, request: DiffusionRequest, timeout_s: float, preview_every: int = 0) -> EngineRequest:
        """Admits a request (raises QueueFull when the step queue is full, PromptTooLong
        for a prompt that does not fit) and returns its handle; await `handle.done`."""
        self.pipeline.tokenize(request)  # reject bad prompts before they queue
        req = EngineRequest(request, deadline=time.monotonic() + timeout_s, preview_every=preview_every)
        self.scheduler.add_request(req)
        self._report_queue()
        self._ensure_running()
        self._wakeup.set()
        return req

    def cancel(self, req: EngineRequest) -> None:
        """The request leaves at the next iteration boundary."""
        if not req.status.finished:
            req.cancel_requested = True
            self._wakeup.set()

    async def generate(self, request: DiffusionRequest, timeout_s: float) -> DiffusionOutput:
        req = self.submit(request, timeout_s)
        try:
            await req.done.wait()
        finally:
            self.cancel(req)
        if req.status != RequestStatus.FINISHED_DONE:
            raise req.error or RuntimeError(FINISH_REASONS[req.status])
        return req.result

    async def close(self) -> None:
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
                worked = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a model failure fails the requests in flight, not the loop
                log.exception("engine %s iteration failed", self.model)
                for r in list(self.scheduler.requests):
                    r.finish(RequestStatus.FINISHED_ERROR, exc)
                    self.observer.finished(self.model, "error")
                self.scheduler.prune()
                worked = True
            self._report_queue()
            if not worked:
                self._wakeup.clear()
                if not self.scheduler.requests:
                    await self._wakeup.wait()
                else:  # only waiting on deadlines
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=0.05)
                    except asyncio.TimeoutError:
                        pass

    async def step(self) -> bool:
        """One iteration; returns whether anything ran."""
        for r in self.scheduler.finish_requests():
            self.observer.finished(self.model, FINISH_REASONS[r.status])
        admitted = await self._admit()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return admitted
        start = time.perf_counter()
        await self._execute(batch)
        seconds = time.perf_counter() - start
        self.iterations += 1
        self.observer.iteration(self.model, batch.rows, len(batch.requests),
                                sum(r.request.num_images for r in batch.requests))
        finished = self.scheduler.update_from_output(batch, seconds)
        await self._previews(batch)
        if finished:
            await self._decode(finished)
        self.scheduler.prune()
        return True

    async def _admit(self) -> bool:
        """Encodes every waiting request's prompts (cache first, misses in one call) and
        starts its trajectory."""
        waiting = [r for r in self.scheduler.requests if r.status == RequestStatus.WAITING]
        if not waiting:
            return False
        start = time.perf_counter()
        ids = {r.id: self.pipeline.tokenize(r.request) for r in waiting}
        found: dict[bytes, np.ndarray] = {}
        misses: dict[bytes, np.ndarray] = {}
        for seq in ids.values():
            for x in seq:
                key = x.tobytes()
                if key in found or key in misses:
                    continue
                hit = self.cache.get(self.model, x)
                if hit is None:
                    misses[key] = x
                else:
                    found[key] = hit
        if misses:
            embeddings = await self.pipeline.encode_prompts(list(misses.values()))
            unconditional = self.pipeline.tokenizer("")
            for (key, x), e in zip(misses.items(), embeddings):
                found[key] = e
                self.cache.put(self.model, x, e, pin=np.array_equal(x, unconditional))
        encode_seconds = time.perf_counter() - start
        for r in waiting:
            if r.status.finished:
                continue
            r.timings["text_encoding_seconds"] = encode_seconds
            t0 = time.perf_counter()
            try:
                r.trajectory = await self.pipeline.start(r.request, np.stack([found[x.tobytes()] for x in ids[r.id]]))
            except Exception as exc:  # e.g. its init image failed to encode: only this request fails
                r.finish(RequestStatus.FINISHED_ERROR, exc)
                self.observer.finished(self.model, "error")
                continue
            r.timings["latent_preparation_seconds"] = time.perf_counter() - t0
            r.timings["denoising_seconds"] = 0.0
            r.status = RequestStatus.RUNNING
        return True

    async def _execute(self, batch: StepBatch) -> None:
        """One U-Net call for every scheduled request, then each advances its own state."""
        start = time.perf_counter()
        inputs = [r.trajectory.model_inputs() for r in batch.requests]
        merged = {k: np.concatenate([x[k] for x in inputs]) for k in inputs[0]}
        noise_pred = (await self.pipeline.backend.infer(self.pipeline.models.unet, merged))["noise_pred"]
        offset = 0
        for r in batch.requests:
            rows = r.trajectory.rows
            r.trajectory.advance(noise_pred[offset:offset + rows])
            offset += rows
            r.timings["denoising_seconds"] += time.perf_counter() - start
            r.emit("progress", step=r.trajectory.steps_done, total=r.trajectory.num_steps,
                   elapsed=round(time.monotonic() - r.arrival, 6))

    async def _previews(self, batch: StepBatch) -> None:
        """The x0 estimate, decoded, every `preview_every` steps for streaming clients."""
        wanted = [r for r in batch.requests if r.preview_every and not r.trajectory.done
                  and r.trajectory.steps_done % r.preview_every == 0
                  and r.trajectory.pred_original_sample is not None]
        for r in wanted:
            images = await self.pipeline.decode(r.trajectory.decoder_input(r.trajectory.pred_original_sample))
            r.emit("preview", step=r.trajectory.steps_done, images=images)

    async def _decode(self, finished: list[EngineRequest]) -> None:
        by_shape: dict[tuple, list[EngineRequest]] = {}
        for r in finished:
            by_shape.setdefault(r.shape, []).append(r)
        for group in by_shape.values():
            start = time.perf_counter()
            latents = np.concatenate([r.trajectory.decoder_input() for r in group])
            images = await self.pipeline.decode(latents)
            seconds = time.perf_counter() - start
            offset = 0
            for r in group:
                n = r.request.num_images
                r.timings["decoding_seconds"] = seconds
                r.result = DiffusionOutput(images[offset:offset + n],
                                           [r.request.seed + i for i in range(n)], dict(r.timings))
                offset += n
                r.finish(RequestStatus.FINISHED_DONE)
                self.observer.finished(self.model, "done")

    def _report_queue(self) -> None:
        self.observer.queue(self.model, len(self.scheduler.requests), self.scheduler.queued_image_steps)
