"""Who runs next: the engine's policy, which runs no model.

Contract (called by DiffusionEngine, in this order every iteration):
  add_request(req)          when a request is admitted (after the queue-bound check)
  schedule() -> StepBatch   which RUNNING requests advance one step together
  update_from_output(batch) after the U-Net call: who is done, who leaves
  finish_requests(...)      cancellations and deadlines, between iterations
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from services.engine.request import EngineRequest, RequestStatus


class QueueFull(Exception):
    """Admitting the request would pass the bound on queued denoising steps."""

    def __init__(self, pending: int, limit: int, retry_after_s: int):
        super().__init__(f"{pending} image-steps already queued; the limit is {limit}")
        self.pending, self.limit, self.retry_after_s = pending, limit, retry_after_s


@dataclass
class StepBatch:
    """One U-Net execution's worth of requests (all of one shape bucket)."""

    requests: list[EngineRequest] = field(default_factory=list)  # oldest first
    rows: int = 0  # U-Net batch rows: images x 2 with guidance


class StepScheduler:
    def __init__(self, max_batch_rows: int, max_queued_image_steps: int):
        self.max_batch_rows = max_batch_rows
        self.max_queued_image_steps = max_queued_image_steps
        self.requests: list[EngineRequest] = []  # unfinished, in arrival order
        self._steps_per_second = 0.0  # image-steps per second, moving average

    # -- admission -------------------------------------------------------------------
    @property
    def queued_image_steps(self) -> int:
        return sum(r.image_steps_left for r in self.requests)

    def add_request(self, req: EngineRequest) -> None:
        """Admits `req`, or raises QueueFull (never blocks: the caller answers 429)."""
        pending = self.queued_image_steps
        if self.requests and pending + req.image_steps_left > self.max_queued_image_steps:
            rate = self._steps_per_second or 1.0
            raise QueueFull(pending, self.max_queued_image_steps, max(1, math.ceil(pending / rate)))
        self.requests.append(req)

    # -- policy ----------------------------------------------------------------------
    def schedule(self) -> StepBatch:
        """Oldest RUNNING request first; it fixes the shape bucket; then every younger
        request of that bucket that still fits under max_batch_rows. The oldest always
        runs, so no request starves; one larger than the limit runs alone (the backend
        splits its rows)."""
        batch = StepBatch()
        running = [r for r in self.requests if r.status == RequestStatus.RUNNING]
        if not running:
            return batch
        bucket = running[0].shape
        for r in running:
            rows = r.trajectory.rows
            if r.shape == bucket and (not batch.requests or batch.rows + rows <= self.max_batch_rows):
                batch.requests.append(r)
                batch.rows += rows
        return batch

    def update_from_output(self, batch: StepBatch, seconds: float) -> list[EngineRequest]:
        """After a U-Net step: moves finished trajectories to DECODING; returns them."""
        images = sum(r.request.num_images for r in batch.requests)
        if seconds > 0:
            rate = images / seconds
            self._steps_per_second = rate if not self._steps_per_second else 0.8 * self._steps_per_second + 0.2 * rate
        finished = []
        for r in batch.requests:
            if r.trajectory.done:
                r.status = RequestStatus.DECODING
                finished.append(r)
        return finished

    def finish_requests(self, now: float | None = None) -> list[EngineRequest]:
        """Cancelled and expired requests leave now (between iterations); returns them."""
        now = time.monotonic() if now is None else now
        gone = []
        for r in self.requests:
            if r.status.finished:
                continue
            if r.cancel_requested:
                r.finish(RequestStatus.FINISHED_CANCELLED)
                gone.append(r)
            elif now > r.deadline:
                r.finish(RequestStatus.FINISHED_TIMEOUT)
                gone.append(r)
        self.prune()
        return gone

    def prune(self) -> None:
        self.requests = [r for r in self.requests if not r.status.finished]
