"""What every endpoint backed by a step engine does: submit (refusals mapped to their
statuses), wait while watching for a client that hangs up, turn the finished request
into its result or its error, and stream progress as server-sent events."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable

from fastapi import Request

from services.context import ServiceContext
from services.diffusion_requests import image_steps
from services.errors import (
    BackendUnavailable,
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ServiceError,
    TooManyRequests,
)
from services.gateway import client_var, request_id_var
from services.http import EventStream, http_status, log_fault

# How often a waiting request checks whether its client went away.
DISCONNECT_POLL_S = 0.1


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def submit(ctx: ServiceContext, engine, request, timeout_s: float, preview_every: int = 0):
    """Queues `request` on `engine`; its handle, or the 4xx/5xx that says why not."""
    from services.engine.scheduler import QueueFull
    from services.pipelines.diffusion import PromptTooLong

    if engine.backend_down:  # requests in flight wait for it; new ones need not
        raise BackendUnavailable(f"the {ctx.backend.name} backend is unavailable; requests in flight resume "
                                 "when it is back", retry_after_s=2)
    ctx.charge_image_steps(image_steps(request, engine.pipeline.spec.strength_rounding))
    try:
        return engine.submit(request, timeout_s, preview_every, tenant=client_var.get())  # fair turns per key
    except PromptTooLong as exc:
        raise InvalidRequest(str(exc), field=exc.field_name, limit=exc.limit) from None
    except QueueFull as exc:
        raise TooManyRequests(f"the {engine.model} queue is full ({exc}); retry in {exc.retry_after_s}s",
                              limit=exc.limit, headers={"Retry-After": str(exc.retry_after_s)}) from None


async def wait(engine, handle, http_request: Request) -> None:
    """Until the request finishes; a client that hangs up cancels it (it leaves the batch
    at the next step, and nobody reads the answer)."""
    while not handle.status.finished:
        try:
            await asyncio.wait_for(handle.done.wait(), timeout=DISCONNECT_POLL_S)
        except TimeoutError:
            if await http_request.is_disconnected():
                engine.cancel(handle)
                raise ClientDisconnected() from None


def result(handle, timeout_s: float):
    """The finished request's DiffusionOutput, or the error it finished with."""
    from services.engine.request import RequestStatus

    if handle.status == RequestStatus.FINISHED_TIMEOUT:
        raise DeadlineExceeded(f"the request did not finish within timeout_s={timeout_s}",
                               field="timeout_s", limit=timeout_s)
    if handle.status != RequestStatus.FINISHED_DONE:
        if isinstance(handle.error, ServiceError):
            raise handle.error
        raise InferenceFailed("generation failed; the request id is in the server log", detail=repr(handle.error))
    return handle.result


def stream(ctx: ServiceContext, engine, handle, respond: Callable[[], object], preview_meta: Callable[[int], dict],
           ) -> EventStream:
    """Server-sent events: `progress` per step, `preview` images every k steps, then
    `result` (what `respond()` returns) or `error`. Closing the connection cancels."""

    async def events():
        # The request id context variable is still set: streaming runs inside the request.
        while (event := await handle.events.get()) is not None:
            if event["event"] == "preview":
                event["images"] = [im.model_dump() for im in ctx.encode_images(
                    event["images"], (-1.0, 1.0), "png",
                    [{**preview_meta(i), "preview_step": event["step"]} for i in range(len(event["images"]))])]
            yield sse(event.pop("event"), event)
        try:
            response = respond()
            if inspect.isawaitable(response):  # a response with stages after denoising (upscale)
                response = await response
            yield sse("result", response.model_dump())
        except ServiceError as exc:
            log_fault(exc)
            yield sse("error", {**exc.body(request_id_var.get()), "status": http_status(exc)})

    return EventStream(events(), on_close=lambda: engine.cancel(handle))
