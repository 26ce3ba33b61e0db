"""A diffusion request's life inside the engine: one object with a status enum."""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from services.pipelines.diffusion import DiffusionOutput, DiffusionRequest, Trajectory, denoising_steps


class RequestStatus(enum.IntEnum):
    WAITING = 0  # admitted; prompt not encoded yet
    RUNNING = 1  # denoising, one step per iteration it is scheduled in
    DECODING = 2  # every step done; waits for the batched VAE decode
    # Finished states: everything from here on is "finished" (one comparison).
    FINISHED_DONE = 3
    FINISHED_CANCELLED = 4
    FINISHED_TIMEOUT = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_DONE


FINISH_REASONS = {
    RequestStatus.FINISHED_DONE: "done",
    RequestStatus.FINISHED_CANCELLED: "cancelled",
    RequestStatus.FINISHED_TIMEOUT: "timeout",
    RequestStatus.FINISHED_ERROR: "error",
}

_ids = itertools.count()


@dataclass(eq=False)
class EngineRequest:
    request: DiffusionRequest
    deadline: float  # time.monotonic() past which the request is dropped
    preview_every: int = 0  # decode a preview of x0 every k steps (0: never)
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    trajectory: Trajectory | None = None
    cancel_requested: bool = False
    error: BaseException | None = None
    result: DiffusionOutput | None = None
    # Progress events for streaming clients: dicts with an "event" key; None ends the stream.
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timings: dict[str, float] = field(default_factory=dict)
    rows_hint: int = 1  # rows per image before the trajectory exists (the engine sets it)
    planned_steps: int | None = None  # steps it will run, by its model's strength rounding (the engine sets it)
    tenant: str = ""  # who asked (the API key's client id): the fair policy shares steps across tenants
    last_turn: int = 0  # the scheduler's iteration in which it last took a step (the fair policy's aging)

    @property
    def started(self) -> Trajectory:
        """Its trajectory, which the engine starts before it schedules the request for a step
        and drops when the request finishes."""
        if self.trajectory is None:
            raise RuntimeError(f"engine request {self.id} has no trajectory ({self.status.name})")
        return self.trajectory

    @property
    def shape(self) -> tuple[int | None, int | None]:
        """The shape bucket: requests of one bucket can share a U-Net call (None: the model's
        native size)."""
        return (self.request.height, self.request.width)

    @property
    def rows_per_image(self) -> int:
        """Denoiser rows per image per step: 2 with classifier-free guidance."""
        if self.trajectory is not None:
            return self.trajectory.rows // max(1, self.request.num_images)
        return self.rows_hint

    @property
    def image_steps_left(self) -> int:
        """Denoising steps still to run, counted per image (the queue's unit)."""
        if self.status.finished:
            return 0
        if self.trajectory is None:
            steps = self.planned_steps if self.planned_steps is not None else denoising_steps(self.request)
        else:
            steps = self.trajectory.num_steps - self.trajectory.steps_done
        return steps * self.request.num_images

    def emit(self, event: str, **data: Any) -> None:
        self.events.put_nowait({"event": event, **data})

    def finish(self, status: RequestStatus, error: BaseException | None = None) -> None:
        if self.status.finished:
            return
        self.status = status
        self.error = error
        self.trajectory = None  # free the latents now, not when the client reads the result
        self.events.put_nowait(None)
        self.done.set()
