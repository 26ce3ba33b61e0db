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
from services.errors import BackendUnavailable

# Throughput assumed before anything was measured (no warm-up, no step run yet), in
# image-steps per second: about one image of SD 1.5 at 512 px on a mid-range GPU, so a
# fresh server's first Retry-After errs on the late side without being absurd.
DEFAULT_IMAGE_STEPS_PER_SECOND = 10.0
MAX_RETRY_AFTER_S = 60


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
        self._steps_per_second = 0.0  # image-steps per second, moving average (0: not measured yet)

    # -- admission -------------------------------------------------------------------
    @property
    def queued_image_steps(self) -> int:
        return sum(r.image_steps_left for r in self.requests)

    @property
    def steps_per_second(self) -> float:
        """Measured image-steps per second, or the default before any measure."""
        return self._steps_per_second or DEFAULT_IMAGE_STEPS_PER_SECOND

    def seed_rate(self, image_steps_per_second: float) -> None:
        """A first measure (the engine's warm-up) until real iterations replace it."""
        if image_steps_per_second > 0 and not self._steps_per_second:
            self._steps_per_second = image_steps_per_second

    def retry_after_s(self, pending: int, wanted: int) -> int:
        """Seconds until `wanted` more image-steps fit under the bound: the excess drained
        at the measured rate (never more than the whole queue's drain time), in [1, 60]."""
        excess = min(max(pending + wanted - self.max_queued_image_steps, 1), max(pending, 1))
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(excess / self.steps_per_second))))

    def add_request(self, req: EngineRequest) -> None:
        """Admits `req`, or raises QueueFull (never blocks: the caller answers 429)."""
        pending, wanted = self.queued_image_steps, req.image_steps_left
        if self.requests and pending + wanted > self.max_queued_image_steps:
            raise QueueFull(pending, self.max_queued_image_steps, self.retry_after_s(pending, wanted))
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
            if r.status.finished:  # failed during the step: it leaves at prune()
                continue
            if r.trajectory.done:
                r.status = RequestStatus.DECODING
                finished.append(r)
        return finished

    def finish_requests(self, now: float | None = None,
                        outage: BackendUnavailable | None = None) -> list[EngineRequest]:
        """Cancelled and expired requests leave now (between iterations); returns them.

        A deadline that passes while the backend is down (`outage`, the engine's last
        BackendUnavailable) finishes the request with FINISHED_ERROR and a BackendUnavailable
        (503: the real reason, worth retrying), not FINISHED_TIMEOUT (504)."""
        now = time.monotonic() if now is None else now
        gone = []
        for r in self.requests:
            if r.status.finished:
                continue
            if r.cancel_requested:
                r.finish(RequestStatus.FINISHED_CANCELLED)
                gone.append(r)
            elif now > r.deadline and outage is None:
                r.finish(RequestStatus.FINISHED_TIMEOUT)
                gone.append(r)
            elif now > r.deadline:
                r.finish(RequestStatus.FINISHED_ERROR, BackendUnavailable(
                    f"the backend was unavailable until the request's deadline passed: {outage.message}",
                    retry_after_s=outage.retry_after_s))
                gone.append(r)
        self.prune()
        return gone

    def prune(self) -> None:
        self.requests = [r for r in self.requests if not r.status.finished]
