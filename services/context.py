"""What every router shares: settings, backend, metrics, the served pipelines, and the
few steps every endpoint ends with (encode images with provenance, record metrics,
charge the image-step rate limit). Built once by the service (services.service, the
composition root), which keeps it in its FastAPI app's state; routers reach it through the
`context` dependency."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from fastapi import Request

from services.config import Settings
from services.errors import BackendUnavailable, InvalidRequest, RateLimited
from services.gateway import client_var
from services.imaging import FORMATS, encode_image, to_uint8
from services.schemas import GeneratedImage, ModelDescription

if TYPE_CHECKING:  # annotations only: these import the runtime, the engine and their dependencies
    from services.adapter_library import AdapterLibrary
    from services.engine.engine import DiffusionEngine
    from services.families import Family
    from services.memory import MemoryGuard
    from services.metrics import ServiceMetrics
    from services.pipelines.pipeline_gan import GANPipeline
    from services.pipelines.pipeline_image_to_image import ImageToImagePipeline
    from services.pipelines.pipeline_stylegan import StyleGANPipeline
    from services.pipelines.pipeline_vae import VAEPipeline
    from services.ratelimit import RateLimiter
    from services.runtime.base import InferenceBackend


@dataclass
class ServiceContext:
    settings: Settings
    backend: InferenceBackend
    metrics: ServiceMetrics
    # One step engine per pipeline of every step-engine family; the other families' pipelines
    # by model name, one field per family, named after it (services.families).
    engines: dict[str, DiffusionEngine] = field(default_factory=dict)
    gan: dict[str, GANPipeline] = field(default_factory=dict)
    stylegan: dict[str, StyleGANPipeline] = field(default_factory=dict)  # served on /v1/gan/* too
    vae: dict[str, VAEPipeline] = field(default_factory=dict)  # standalone and every latent pipeline's
    image_to_image: dict[str, ImageToImagePipeline] = field(default_factory=dict)  # SR and translators
    image_step_limiter: RateLimiter | None = None
    memory: MemoryGuard | None = None  # GENSERVE_MEMORY_LIMIT_MB
    describers: list[Callable[[ServiceContext], list[ModelDescription]]] = field(default_factory=list)
    adapters: AdapterLibrary = field(default_factory=lambda: _adapter_library())  # LoRA adapters loaded

    def model_name(self, asked: str | None, family: str, served) -> str:
        """The model a request names, else its family's default (`gan`, `diffusion`, `ddpm`,
        `vae`); a 422 naming `model` when there is none to fall back on."""
        name = asked or getattr(self.settings.defaults, family)
        if name is None:
            raise InvalidRequest(f"model: this server serves several {family} models and has no default "
                                 f"(GENSERVE_DEFAULT_{family.upper()}_MODEL is not set): name one",
                                 field="model", allowed=sorted(served))
        return name

    def engines_of(self, *families: str) -> dict[str, DiffusionEngine]:
        return {name: e for name, e in self.engines.items() if e.pipeline.spec.family in families}

    def served(self, family: Family) -> dict:
        """The family's models served here, by name: its engines, or its field's pipelines."""
        return self.engines_of(family.name) if family.step_engine else getattr(self, family.name)

    def encode_images(self, images: np.ndarray, value_range, fmt: str, metas: list[dict]) -> list[GeneratedImage]:
        """[N, C, H, W] in `value_range` -> images in `fmt`, each saying in its metadata that
        it was generated, by which model and with which seed."""
        out = []
        for i, (pixels, meta) in enumerate(zip(to_uint8(images, *value_range), metas)):
            data = encode_image(pixels, fmt, meta)
            out.append(GeneratedImage(
                index=i, seed=meta.get("seed"), media_type=FORMATS[fmt], width=pixels.shape[1],
                height=pixels.shape[0], data=base64.b64encode(data).decode("ascii")))
        return out

    def record(self, pipeline: str, model: str, num_images: int, start: float) -> float:
        """Counts the images and the pipeline's duration; returns the seconds since `start`."""
        total = time.perf_counter() - start
        labels = {"pipeline": pipeline, "model": model, "backend": self.backend.name}
        self.metrics.images_generated.labels(**labels).inc(num_images)
        self.metrics.pipeline_duration_seconds.labels(**labels).observe(total)
        return total

    def charge_image_steps(self, cost: int) -> None:
        """GENSERVE_RATE_LIMIT_IMAGE_STEPS: diffusion work per key, in image-steps."""
        if self.image_step_limiter is None:
            return
        from services.ratelimit import retry_after

        limit = self.image_step_limiter.rate
        if cost > limit.count:
            raise InvalidRequest(f"this request costs {cost} image-steps (steps x images); a key may spend at "
                                 f"most {limit} image-steps", field="num_inference_steps", limit=int(limit.count))
        client = client_var.get()
        wait = self.image_step_limiter.acquire(client, cost)
        if wait > 0:
            self.metrics.observe_rate_limited(client, "image_steps")
            raise RateLimited(f"more than {limit} diffusion image-steps; retry in {retry_after(wait)}s",
                              limit=str(limit), headers={"Retry-After": str(retry_after(wait))})

    def timeout_s(self, asked: float | None) -> float:
        """The request's deadline: asked (bounded by the configured maximum) or the default."""
        timeout_s = asked or self.settings.engine.request_timeout_s
        if timeout_s > self.settings.engine.max_request_timeout_s:
            raise InvalidRequest(f"timeout_s must be at most {self.settings.engine.max_request_timeout_s}",
                                 field="timeout_s", limit=self.settings.engine.max_request_timeout_s)
        return timeout_s


async def context(request: Request) -> ServiceContext:
    """FastAPI dependency: the running service's context, which the service keeps in its app's
    state. A coroutine: FastAPI runs a plain function dependency in its thread pool, two
    thread wake-ups on every request for one attribute (0.3-3 ms of a txt2img request on the
    loaded 2-core machine)."""
    ctx = getattr(request.app.state, "context", None)
    if ctx is None:
        raise BackendUnavailable("the service is starting; retry", retry_after_s=1)
    return ctx


def _adapter_library() -> AdapterLibrary:
    from services.adapter_library import AdapterLibrary

    return AdapterLibrary()
