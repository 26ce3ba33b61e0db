"""Checks of a diffusion request against its model, raising InvalidRequest (services.errors)
that names the field and its limit. Both the HTTP layer (services.diffusion_requests, before
anything is decoded) and the engine (at admission) run them; the error handlers map them to HTTP."""

from __future__ import annotations

from services.errors import InvalidRequest
from services.pipelines.diffusion import MAX_CACHE_INTERVAL, DiffusionSpec, effective_steps


def check_denoising_steps(num_inference_steps: int, strength: float, from_image: bool,
                          rounding: str = "steps") -> None:
    """Refuses a request that would run no denoising step (InvalidRequest, 422), naming the
    smallest strength that runs one (1/n rounded up to 4 decimals). `rounding`: the model's
    (DiffusionSpec.strength_rounding)."""
    n = num_inference_steps
    if n < 1:
        raise InvalidRequest("num_inference_steps must be at least 1", field="num_inference_steps", limit=1)
    if not from_image or effective_steps(n, strength, rounding) >= 1:
        return
    minimum = -(-10_000 // n) / 10_000
    while effective_steps(n, minimum, rounding) < 1:  # guard float rounding (n * (1/n) can be 0.999...)
        minimum = round(minimum + 0.0001, 4)
    raise InvalidRequest(
        f"strength x num_inference_steps must give at least 1 denoising step: with "
        f"num_inference_steps={n}, strength must be at least {minimum:g} (got {strength:g})",
        field="strength", limit=minimum)


def check_cache_interval(spec: DiffusionSpec, cache_interval: int) -> None:
    """Refuses a DeepCache interval outside 1..MAX_CACHE_INTERVAL, or above 1 for a model
    exported without the shallow denoiser graph (InvalidRequest, 422, naming the limit)."""
    limit = MAX_CACHE_INTERVAL if spec.shallow_denoiser is not None else 1
    if 1 <= cache_interval <= limit:
        return
    if limit == 1 and cache_interval > 1:
        raise InvalidRequest(f"cache_interval must be 1 for model {spec.name!r}: it has no shallow denoiser graph "
                             f"(DeepCache needs a U-Net exported with it; see export/deepcache.py)",
                             field="cache_interval", limit=1)
    raise InvalidRequest(f"cache_interval must be from 1 to {limit}, got {cache_interval}",
                         field="cache_interval", limit=limit)


def check_scheduler(scheduler: str, model: str, schedulers: list[str]) -> None:
    """Refuses a scheduler the model's scheduler config cannot build (InvalidRequest, 422)."""
    if scheduler not in schedulers:
        raise InvalidRequest(f"scheduler {scheduler!r} cannot be built from model {model!r}'s "
                             f"scheduler config; choose one of {', '.join(schedulers)}",
                             field="scheduler", allowed=schedulers)
