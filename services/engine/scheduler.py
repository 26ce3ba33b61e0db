"""Who runs next: the engine's policy, which runs no model.

Contract (called by DiffusionEngine, in this order every iteration):
  add_request(req)          when a request is admitted (after the queue-bound check)
  schedule() -> StepBatch   which RUNNING requests advance one step together (the overlapped
                            loop asks while the previous call runs: schedule(ahead=its requests))
  update_from_output(batch) after the U-Net call: who is done, who leaves
  finish_requests(...)      cancellations and deadlines, between iterations
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from services.engine.cost_model import CostModel
from services.engine.request import EngineRequest, RequestStatus
from services.errors import BackendUnavailable

# Throughput assumed before anything was measured (no warm-up, no step run yet), in
# image-steps per second: about one image of SD 1.5 at 512 px on a mid-range GPU, so a
# fresh server's first Retry-After errs on the late side without being absurd.
DEFAULT_IMAGE_STEPS_PER_SECOND = 10.0
MAX_RETRY_AFTER_S = 60

POLICIES = ("fair", "fcfs")
# The fair policy's virtual deadline: arrival + STRETCH x (the request's steps left x one
# iteration's measured time). A request may be passed by shorter ones that arrived up to
# STRETCH x the difference in work later, never by more: short requests finish first,
# long ones age into the front (no starvation).
STRETCH = 8.0
# At most this share of an iteration's rows goes to requests taking their first step
# ahead of the others (a fresh request's first progress event does not wait for the queue).
FIRST_STEP_SHARE = 0.5
# The fair policy's progress guarantee: a request that has taken its first step and then
# sat out this many iterations goes before everything else (oldest turn first), so its
# steps keep a bounded pace however many shorter or fresher requests arrive: it waits at
# most MAX_STEP_GAP + S iterations between two steps, S being the requests that began
# waiting before it (each iteration runs the longest-waiting one). The virtual deadline
# alone let a stream of short requests pass a long one for STRETCH x its remaining work
# (at 100 clients: a minute between steps).
MAX_STEP_GAP = 8


class QueueFull(Exception):
    """Admitting the request would pass the bound on queued denoising steps (or on the
    queue's estimated drain time, when that bound is set)."""

    def __init__(self, pending: int, limit: int, retry_after_s: int, message: str | None = None):
        super().__init__(message or f"{pending} image-steps already queued; the limit is {limit}")
        self.pending, self.limit, self.retry_after_s = pending, limit, retry_after_s


@dataclass
class StepBatch:
    """One U-Net execution's worth of requests (all of one shape bucket)."""

    requests: list[EngineRequest] = field(default_factory=list)  # oldest first
    rows: int = 0  # U-Net batch rows: images x 2 with guidance


class StepScheduler:
    def __init__(self, max_batch_rows: int, max_queued_image_steps: int, cost: CostModel | None = None,
                 max_queue_seconds: float = 0.0, policy: str = "fair"):
        """`cost` prices rows (a fresh, unmeasured model: "as many as fit" until it learns);
        `max_queue_seconds` (0: off) also bounds the queue by its estimated drain time;
        `policy` orders the running requests (see schedule())."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.served: dict[str, float] = {}  # rows run per tenant (API key) while it has requests
        self.max_batch_rows = max_batch_rows
        self.max_queued_image_steps = max_queued_image_steps
        self.max_queue_seconds = max_queue_seconds
        self.cost = cost if cost is not None else CostModel(max_batch_rows)
        self.requests: list[EngineRequest] = []  # unfinished, in arrival order
        self.iteration = 0  # batches scheduled so far (the clock of the progress guarantee)
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

    def work_seconds(self, req: EngineRequest) -> float | None:
        """The request's remaining denoiser work priced by the cost model: row-steps left x
        seconds per row at its bucket's best size (None before any measure)."""
        per_row = self.cost.seconds_per_row(req.shape)
        if per_row is None:
            return None
        return req.image_steps_left * req.rows_per_image * per_row

    def queue_seconds(self) -> float | None:
        """Estimated seconds to drain everything queued (None before any measure)."""
        total = 0.0
        for r in self.requests:
            seconds = self.work_seconds(r)
            if seconds is None:
                return None
            total += seconds
        return total

    def retry_after_s(self, pending: int, wanted: int) -> int:
        """Seconds until `wanted` more image-steps fit under the bound: the excess drained
        at the measured cost (never more than the whole queue's drain time), in [1, 60].
        The drain time is the queue's rows priced by the cost model; before it has a
        measure, the image-step rate (measured, or the default) stands in."""
        excess = min(max(pending + wanted - self.max_queued_image_steps, 1), max(pending, 1))
        drain = self.queue_seconds()
        if drain is not None and pending > 0:
            seconds = drain * excess / pending
        else:
            seconds = excess / self.steps_per_second
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds - 1e-9))))  # 22.000000001 is 22

    def add_request(self, req: EngineRequest) -> None:
        """Admits `req`, or raises QueueFull (never blocks: the caller answers 429)."""
        pending, wanted = self.queued_image_steps, req.image_steps_left
        if self.requests and pending + wanted > self.max_queued_image_steps:
            raise QueueFull(pending, self.max_queued_image_steps, self.retry_after_s(pending, wanted))
        if self.requests and self.max_queue_seconds > 0:
            drain, own = self.queue_seconds(), self.work_seconds(req)
            if drain is not None and own is not None and drain + own > self.max_queue_seconds:
                wait = int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(drain + own - self.max_queue_seconds))))
                raise QueueFull(pending, self.max_queued_image_steps, wait, message=(
                    f"the queue already holds {drain:.1f}s of denoising work (measured cost); "
                    f"the limit is {self.max_queue_seconds:g}s"))
        self.requests.append(req)

    # -- policy ----------------------------------------------------------------------
    def schedule(self, now: float | None = None, ahead: Collection[EngineRequest] = ()) -> StepBatch:
        """Which RUNNING requests advance one step together. `ahead`: requests whose step is
        in flight (the overlapped loop plans the next call while the current one runs): each
        counts as one step further, so one whose last step is in flight is left out. The first in the policy's order
        fixes the shape bucket; then every later request of that bucket that still fits under
        the target rows: the size with the most rows per second by the cost model (never past
        max_batch_rows; all of them before anything was measured). The first always runs;
        one larger than the target runs alone (the backend splits past the model's max).

        Orders:
          fcfs  arrival order: the oldest requests run to completion first
          fair  requests that have waited more than MAX_STEP_GAP iterations since their
                last step first (longest wait first: the progress guarantee); then
                requests taking their first step (arrival order, at most
                FIRST_STEP_SHARE of the rows); then urgent ones, whose deadline leaves less
                than their remaining steps would take, by deadline; then by virtual deadline
                (arrival + STRETCH x remaining work), so short requests finish first and long
                ones age to the front. Across tenants (API keys), turns: the tenant served
                least so far picks first, then the next, and so on.
        """
        batch = StepBatch()
        running = [r for r in self.requests if self.runs_next(r, ahead)]
        if not running:
            return batch
        now = time.monotonic() if now is None else now
        self.iteration += 1
        if self.policy == "fcfs":
            order = running
        elif len(running) == 1:  # nothing to order (the fair order's tenant bookkeeping, kept)
            order = running
            self.served = {running[0].tenant: self.served.get(running[0].tenant, 0.0)}
        else:
            order = self._fair_order(running, now, ahead)
            starving = sorted((r for r in order if self.steps_done(r, ahead)
                               and self.iteration - r.last_turn > MAX_STEP_GAP), key=lambda r: (r.last_turn, r.arrival))
            if starving:  # the progress guarantee first (MAX_STEP_GAP), in its own bucket
                ids = {id(r) for r in starving}
                order = starving + [r for r in order if id(r) not in ids]
        head = order[0]
        waiting = sum(r.started.rows for r in running if self.can_share(head, r))
        target = min(self.max_batch_rows, self.cost.target_rows(head.shape, waiting))
        first_step_rows, first_step_cap = 0, max(1, int(target * FIRST_STEP_SHARE))
        for r in order:
            rows = r.started.rows
            if not self.can_share(head, r) or (batch.requests and batch.rows + rows > target):
                continue
            if self.policy == "fair" and self.steps_done(r, ahead) == 0:
                if batch.requests and first_step_rows + rows > first_step_cap:
                    continue  # waits for its turn by virtual deadline, or the next iteration
                first_step_rows += rows
            batch.requests.append(r)
            batch.rows += rows
        for r in batch.requests:
            r.last_turn = self.iteration
        if self.policy == "fair":
            for r in batch.requests:
                self.served[r.tenant] = self.served.get(r.tenant, 0.0) + r.started.rows
        return batch

    def join_late(self, batch: StepBatch) -> StepBatch:
        """A batch planned while the last call ran, topped up at launch with the requests
        admitted since (first steps: the fair order runs them first) that may share its call,
        while their rows fit under max_batch_rows. A policy whose batches nobody joins once
        they run overrides it."""
        if not batch.requests:
            return batch
        head, planned = batch.requests[0], set(batch.requests)
        for r in self.requests:
            if (r.status == RequestStatus.RUNNING and r not in planned and r.started.steps_done == 0
                    and self.can_share(head, r) and batch.rows + r.started.rows <= self.max_batch_rows):
                batch.requests.append(r)
                batch.rows += r.started.rows
                r.last_turn = self.iteration
                if self.policy == "fair":
                    self.served[r.tenant] = self.served.get(r.tenant, 0.0) + r.started.rows
        return batch

    @staticmethod
    def steps_done(r: EngineRequest, ahead: Collection[EngineRequest] = ()) -> int:
        """Its steps done, counting one in flight (`ahead`) as done."""
        return r.started.steps_done + (r in ahead)

    def runs_next(self, r: EngineRequest, ahead: Collection[EngineRequest] = ()) -> bool:
        """RUNNING, and not with its last step in flight (`ahead`)."""
        return r.status == RequestStatus.RUNNING and (r not in ahead or r.started.steps_done + 1 < r.started.num_steps)

    def can_share(self, head: EngineRequest, r: EngineRequest) -> bool:
        """Whether `r` may join the U-Net call that `head` (the first in the policy's order)
        fixes: any request of its shape bucket (steps, guidance and schedulers may differ)."""
        return r.shape == head.shape

    def _fair_order(self, running: list[EngineRequest], now: float,
                    ahead: Collection[EngineRequest] = ()) -> list[EngineRequest]:
        iteration_s = {}

        def step_s(r):  # one iteration's measured time at the request's bucket (0: unmeasured)
            if r.shape not in iteration_s:
                rows = self.cost.best_rows(r.shape)
                iteration_s[r.shape] = self.cost.latency(r.shape, rows) or 0.0
            return iteration_s[r.shape]

        def key(r):
            done = self.steps_done(r, ahead)
            left = r.started.num_steps - done
            if done == 0:
                return (0, r.arrival)
            alone = left * step_s(r)
            if r.deadline - now < 2 * alone:  # the deadline is near: earliest deadline first
                return (1, r.deadline)
            return (2, r.arrival + STRETCH * alone)

        by_tenant: dict[str, list[EngineRequest]] = {}
        for r in sorted(running, key=key):
            by_tenant.setdefault(r.tenant, []).append(r)
        if len(by_tenant) == 1:
            self.served = {t: v for t, v in self.served.items() if t in by_tenant}
            return next(iter(by_tenant.values()))
        self.served = {t: self.served.get(t, 0.0) for t in by_tenant}  # a tenant that left starts over
        turns = sorted(by_tenant, key=lambda t: (self.served[t], t))
        order: list[EngineRequest] = []
        depth = 0
        while len(order) < len(running):
            for t in turns:
                if depth < len(by_tenant[t]):
                    order.append(by_tenant[t][depth])
            depth += 1
        return order

    def update_from_output(self, batch: StepBatch, seconds: float) -> list[EngineRequest]:
        """After a U-Net step: moves finished trajectories to DECODING; returns them."""
        images = sum(r.request.num_images for r in batch.requests)
        if seconds > 0 and images:  # an iteration whose calls all met an outage measures nothing
            rate = images / seconds
            self._steps_per_second = rate if not self._steps_per_second else 0.8 * self._steps_per_second + 0.2 * rate
        finished = []
        for r in batch.requests:
            if r.status.finished:  # failed during the step: it leaves at prune()
                continue
            if r.started.done:
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
            elif now > r.deadline and outage is not None:
                r.finish(RequestStatus.FINISHED_ERROR, BackendUnavailable(
                    f"the backend was unavailable until the request's deadline passed: {outage.message}",
                    retry_after_s=outage.retry_after_s))
                gone.append(r)
        self.prune()
        return gone

    def prune(self) -> None:
        self.requests = [r for r in self.requests if not r.status.finished]
