"""Pixel-space DDPM/DDIM: `POST /v1/ddpm/generate` and `/v1/ddpm/generate/stream`, on the
step engine like every diffusion family."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from services import families
from services.context import ServiceContext, context
from services.errors import ModelNotFound
from services.gateway import request_id_var
from services.imaging import FORMATS
from services.openapi import SSE_RESPONSE, error_responses
from services.pipelines.diffusion import DiffusionRequest
from services.pipelines.pipeline_ddpm import DDPMPipeline
from services.routers import engine_calls, image_to_image
from services.schemas import (
    MAX_IMAGES_PER_REQUEST,
    MAX_INFERENCE_STEPS,
    MAX_SEED,
    MIN_TIMEOUT_S,
    DDPMGenerateRequest,
    DDPMGenerateStreamRequest,
    DiffusionResponse,
    ModelDescription,
    check_class_label,
    resolve_seed,
    tensors,
)

if TYPE_CHECKING:
    from services.engine.engine import DiffusionEngine

router = APIRouter()
PIXEL_FAMILIES = families.names(router=__name__)  # pixel-space diffusion, on the step engine


@router.post("/ddpm/generate", response_model=DiffusionResponse, responses=error_responses())
async def ddpm_generate(body: DDPMGenerateRequest, request: Request,
                        ctx: ServiceContext = Depends(context)) -> DiffusionResponse:
    """Samples a pixel-space diffusion model: seeded, class-conditioned where the model is."""
    start = time.perf_counter()
    name, engine, handle, params = _submit(ctx, body)
    await engine_calls.wait(engine, handle, request)
    return await _respond(ctx, name, body, params, handle, start)


@router.post("/ddpm/generate/stream", response_class=StreamingResponse,
             responses={**SSE_RESPONSE, **error_responses()})
async def ddpm_generate_stream(body: DDPMGenerateStreamRequest,
                               ctx: ServiceContext = Depends(context)) -> StreamingResponse:
    """Server-sent events: `progress` per step, `preview` every `preview_every` steps (the
    current x0 estimate), then `result` (the /v1/ddpm/generate response) or `error`."""
    start = time.perf_counter()
    name, engine, handle, params = _submit(ctx, body)
    return engine_calls.stream(ctx, engine, handle, lambda: _respond(ctx, name, body, params, handle, start),
                               lambda i: {"model": name, "seed": params["seed"] + i})


def _submit(ctx: ServiceContext, body):
    engines = ctx.engines_of(*PIXEL_FAMILIES)
    name = ctx.model_name(body.model, "ddpm", engines)
    if name not in engines:
        raise ModelNotFound(f"model {name!r} is not a pixel-space diffusion model served here", field="model",
                            allowed=sorted(engines))
    engine = engines[name]
    num_classes = _num_classes(engine)
    check_class_label(name, body.class_label, num_classes)
    seed = resolve_seed(body.seed, body.num_images)
    labels = None
    if num_classes:  # a label not given is drawn per image from a generator of its own
        labels = [body.class_label if body.class_label is not None
                  else int(np.random.default_rng(seed + i).integers(num_classes)) for i in range(body.num_images)]
    spec = engine.pipeline.spec
    timeout_s = ctx.timeout_s(body.timeout_s)
    request = DiffusionRequest(num_images=body.num_images, num_inference_steps=body.num_inference_steps,
                               guidance_scale=0.0, scheduler=body.scheduler, height=spec.native_height,
                               width=spec.native_width, seed=seed, class_labels=labels)
    params = {**body.model_dump(exclude={"model", "upscale"}), "seed": seed, "class_labels": labels,
              "timeout_s": timeout_s, "height": spec.native_height, "width": spec.native_width}
    if body.upscale is not None:  # refused before queuing, not after denoising
        image_to_image.check_upscale(ctx, body.upscale, spec.native_height, spec.native_width, body.num_images)
    handle = engine_calls.submit(ctx, engine, request, timeout_s, getattr(body, "preview_every", 0))
    return name, engine, handle, params


async def _respond(ctx: ServiceContext, name: str, body, params: dict, handle, start: float) -> DiffusionResponse:
    out = engine_calls.result(handle, params["timeout_s"])
    labels = params["class_labels"] or [None] * len(out.seeds)
    metas = [{"model": name, "task": "ddpm", "seed": seed, "class_label": label,
              "num_inference_steps": body.num_inference_steps, "scheduler": body.scheduler}
             for seed, label in zip(out.seeds, labels)]
    timings = {k: round(v, 6) for k, v in out.timings.items()}
    pixels, value_range, fmt = await image_to_image.chain(ctx, body.upscale, out.images, (-1.0, 1.0),
                                                          body.output_format, metas, params, timings)
    images = ctx.encode_images(pixels, value_range, fmt, metas)
    for image, label in zip(images, labels):
        image.class_label = label
    total = ctx.record("ddpm", name, len(images), start)
    return DiffusionResponse(
        request_id=request_id_var.get(), model=name, backend=ctx.backend.name, parameters=params, images=images,
        timings={**timings, "total_seconds": round(total, 6)},
    )


def _num_classes(engine: DiffusionEngine) -> int:
    """The model's class count (0: unconditional); the pixel-space families' pipelines are DDPMPipelines."""
    pipeline = engine.pipeline
    assert isinstance(pipeline, DDPMPipeline), f"{pipeline.name}: a pixel-space family's pipeline is a DDPMPipeline"
    return pipeline.num_classes


def describe(ctx: ServiceContext) -> list[ModelDescription]:
    models = []
    for name, engine in ctx.engines_of(*PIXEL_FAMILIES).items():
        spec = engine.pipeline.spec
        unet = ctx.backend.models()[spec.denoiser]
        params = {
            "schedulers": engine.pipeline.schedulers,
            "num_images": {"min": 1, "max": MAX_IMAGES_PER_REQUEST},
            "num_inference_steps": {"min": 1, "max": MAX_INFERENCE_STEPS},
            "seed": {"min": 0, "max": MAX_SEED}, "output_format": sorted(FORMATS),
            "height": spec.native_height, "width": spec.native_width,
            "timeout_s": {"default": ctx.settings.engine.request_timeout_s, "min": MIN_TIMEOUT_S,
                          "max": ctx.settings.engine.max_request_timeout_s},
        }
        if num_classes := _num_classes(engine):
            params["class_label"] = {"min": 0, "max": num_classes - 1}
        models.append(ModelDescription(
            name=name, version=unet.version, pipeline=spec.family,
            endpoint="/v1/ddpm/generate, /v1/ddpm/generate/stream",
            backend=ctx.backend.name, max_batch_size=unet.max_batch_size,
            inputs=tensors(unet.inputs), outputs=tensors(unet.outputs), parameters=params,
            cost_model=engine.cost.describe(),
        ))
    return models
