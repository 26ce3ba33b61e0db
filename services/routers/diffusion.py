"""Text-conditioned diffusion, any family that takes prompts (SD 1/2, SDXL, FLUX):
`POST /v1/txt2img`, `/v1/txt2img/stream`, `/v1/img2img`, `/v1/inpaint`."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from services import families
from services.context import ServiceContext, context
from services.diffusion_requests import build_request
from services.errors import ModelNotFound
from services.gateway import request_id_var
from services.http import parse_body
from services.imaging import FORMATS
from services.openapi import SSE_RESPONSE, body_schema, error_responses
from services.pipelines.diffusion import MAX_CACHE_INTERVAL
from services.routers import engine_calls, image_to_image
from services.schemas import (
    MAX_CONDITIONING_SCALE,
    MAX_CONTROLNET_UNITS,
    MAX_DIFFUSION_IMAGES,
    MAX_GUIDANCE_SCALE,
    MAX_INFERENCE_STEPS,
    MAX_LORA_SCALE,
    MAX_SEED,
    MIN_LORA_SCALE,
    MIN_TIMEOUT_S,
    DiffusionResponse,
    Img2ImgRequest,
    InpaintRequest,
    ModelDescription,
    Txt2ImgRequest,
    Txt2ImgStreamRequest,
    tensors,
)

router = APIRouter()
TEXT_FAMILIES = families.names(text_conditioned=True)


@router.post("/txt2img", response_model=DiffusionResponse, responses=error_responses())
async def txt2img(body: Txt2ImgRequest, request: Request, ctx: ServiceContext = Depends(context)) -> DiffusionResponse:
    """Text to image with latent diffusion and classifier-free guidance."""
    return await _diffuse(ctx, "txt2img", body, request)


@router.post("/img2img", response_model=DiffusionResponse, responses=error_responses(),
             openapi_extra=body_schema(Img2ImgRequest))
async def img2img(request: Request, ctx: ServiceContext = Depends(context)) -> DiffusionResponse:
    """Image to image: the input image noised to `strength`, then denoised toward the prompt.
    JSON (image as base64) or multipart/form-data (image as a file)."""
    return await _diffuse(ctx, "img2img", await parse_body(request, Img2ImgRequest), request)


@router.post("/inpaint", response_model=DiffusionResponse, responses=error_responses(),
             openapi_extra=body_schema(InpaintRequest))
async def inpaint(request: Request, ctx: ServiceContext = Depends(context)) -> DiffusionResponse:
    """Repaints the white area of `mask`, keeping the rest of `image` (latent blending)."""
    return await _diffuse(ctx, "inpaint", await parse_body(request, InpaintRequest), request)


@router.post("/txt2img/stream", response_class=StreamingResponse, responses={**SSE_RESPONSE, **error_responses()})
async def txt2img_stream(body: Txt2ImgStreamRequest, ctx: ServiceContext = Depends(context)) -> StreamingResponse:
    """Server-sent events: `progress` per step (step, total, elapsed), `preview` every
    `preview_every` steps (the current x0 estimate as images), then `result` (the
    txt2img response) or `error`. Closing the connection cancels the request."""
    start = time.perf_counter()
    name, engine, handle, params = await _submit(ctx, "txt2img", body)
    return engine_calls.stream(
        ctx, engine, handle, lambda: _respond_chained(ctx, "txt2img", name, body, params, handle, start),
        lambda i: {"model": name, "seed": params["seed"] + i})


async def _diffuse(ctx: ServiceContext, task: str, body, request: Request) -> DiffusionResponse:
    """Validates, queues on the pipeline's engine, waits (leaving the batch if the client
    goes away), and answers with the images and everything that reproduces them."""
    start = time.perf_counter()
    name, engine, handle, params = await _submit(ctx, task, body)
    await engine_calls.wait(engine, handle, request)
    return await _respond_chained(ctx, task, name, body, params, handle, start)


async def _submit(ctx: ServiceContext, task: str, body):
    engines = ctx.engines_of(*TEXT_FAMILIES)
    name = ctx.model_name(body.model, "diffusion", engines)
    if name not in engines:
        raise ModelNotFound(f"model {name!r} is not a text-to-image pipeline served here", field="model",
                            allowed=sorted(engines))
    engine = engines[name]
    timeout_s = ctx.timeout_s(body.timeout_s)
    max_adapters = ctx.settings.engine.max_adapters_per_request
    if task == "txt2img" and not getattr(body, "controlnet", None):
        request, params = build_request(task, body, engine.pipeline, max_adapters)
    else:  # decoding images (init, mask, control) is CPU work: off the event loop
        request, params = await asyncio.to_thread(build_request, task, body, engine.pipeline, max_adapters)
    await engine.pipeline.load_adapters(request)  # before it queues: the first use pays the load
    params["timeout_s"] = timeout_s
    params.pop("upscale", None)  # echoed by the upscale stage, when there is one
    if getattr(body, "upscale", None) is not None:  # refused before queuing, not after denoising
        image_to_image.check_upscale(ctx, body.upscale, params["height"], params["width"],
                                     request.num_images)
    handle = engine_calls.submit(ctx, engine, request, timeout_s, getattr(body, "preview_every", 0))
    return name, engine, handle, params


def _respond(ctx: ServiceContext, task: str, name: str, body, params: dict, handle, start: float) -> DiffusionResponse:
    """The finished request's response (synchronous: /v1/images/* builds on it too)."""
    out = engine_calls.result(handle, params["timeout_s"])
    timings = {k: round(v, 6) for k, v in out.timings.items()}
    return _encode(ctx, task, name, params, out.images, (-1.0, 1.0), body.output_format,
                   _metas(task, name, body, params, out.seeds), timings, start)


async def _respond_chained(ctx: ServiceContext, task: str, name: str, body, params: dict, handle,
                           start: float) -> DiffusionResponse:
    """_respond, with the super-resolution stage run first when the request asks for one."""
    if getattr(body, "upscale", None) is None:
        return _respond(ctx, task, name, body, params, handle, start)
    out = engine_calls.result(handle, params["timeout_s"])
    metas, timings = _metas(task, name, body, params, out.seeds), {k: round(v, 6) for k, v in out.timings.items()}
    pixels, value_range, fmt = await image_to_image.chain(ctx, body.upscale, out.images, (-1.0, 1.0),
                                                          body.output_format, metas, params, timings)
    return _encode(ctx, task, name, params, pixels, value_range, fmt, metas, timings, start)


def _metas(task: str, name: str, body, params: dict, seeds) -> list[dict]:
    adapters = {"lora": params["lora"]} if params.get("lora") else {}  # the adapters and their scales
    return [{"model": name, "task": task, "seed": seed, "prompt": body.prompt,
             "num_inference_steps": body.num_inference_steps, "guidance_scale": params["guidance_scale"],
             "scheduler": params["scheduler"], **adapters} for seed in seeds]


def _encode(ctx: ServiceContext, task: str, name: str, params: dict, pixels, value_range, fmt: str, metas: list,
            timings: dict, start: float) -> DiffusionResponse:
    images = ctx.encode_images(pixels, value_range, fmt, metas)
    total = ctx.record(task, name, len(images), start)
    return DiffusionResponse(
        request_id=request_id_var.get(), model=name, backend=ctx.backend.name, parameters=params, images=images,
        timings={**timings, "total_seconds": round(total, 6)},
    )


def describe(ctx: ServiceContext) -> list[ModelDescription]:
    models = []
    for name, engine in ctx.engines_of(*TEXT_FAMILIES).items():
        spec = engine.pipeline.spec
        denoiser = ctx.backend.models()[spec.denoiser]
        sides = spec.side_limits()
        params = {
            "components": list(spec.components),
            "schedulers": engine.pipeline.schedulers,
            "default_scheduler": engine.pipeline.default_scheduler,
            "prompt_max_tokens": getattr(engine.pipeline.conditioner, "max_tokens", None),
            "num_images": {"min": 1, "max": MAX_DIFFUSION_IMAGES},
            "num_inference_steps": {"min": 1, "max": MAX_INFERENCE_STEPS},
            "guidance_scale": {"min": 0.0, "max": MAX_GUIDANCE_SCALE, "default": spec.default_guidance_scale,
                               "meaning": spec.guidance},
            "height": sides["height"], "width": sides["width"],
            "strength": {"min": 0.0, "max": 1.0, "exclusive_min": True},
            "cache_interval": {"min": 1, "max": MAX_CACHE_INTERVAL if spec.shallow_denoiser else 1, "default": 1},
            "seed": {"min": 0, "max": MAX_SEED}, "output_format": sorted(FORMATS),
            "timeout_s": {"default": ctx.settings.engine.request_timeout_s, "min": MIN_TIMEOUT_S,
                          "max": ctx.settings.engine.max_request_timeout_s},
        }
        params.update({key: "optional [2 ints]" for key in spec.extra_fields})
        adapters = engine.pipeline.adapters
        params["lora"] = ({"adapters": adapters.names, "max_per_request": ctx.settings.engine.max_adapters_per_request,
                           "scale": {"min": MIN_LORA_SCALE, "max": MAX_LORA_SCALE, "default": 1.0},
                           "manage": "/v1/adapters"}
                          if adapters is not None and adapters.serves else None)
        control = engine.pipeline.control
        params["controlnet"] = ({"models": sorted(control.models), "max_units": MAX_CONTROLNET_UNITS,
                                 "conditioning_scale": {"min": 0.0, "max": MAX_CONDITIONING_SCALE}}
                                if control is not None else None)
        models.append(ModelDescription(
            name=name, version=denoiser.version, pipeline=spec.family,
            endpoint="/v1/txt2img, /v1/txt2img/stream"
            + (", /v1/img2img, /v1/inpaint" if spec.vae_encoder else "")
            + (_vae_endpoints(spec) if name in ctx.vae else ""),
            backend=ctx.backend.name, max_batch_size=denoiser.max_batch_size,
            inputs=tensors(denoiser.inputs), outputs=tensors(denoiser.outputs), parameters=params,
            cost_model=engine.cost.describe(),
        ))
    return models


def _vae_endpoints(spec) -> str:
    """The /v1/vae/* endpoints serving a latent family's pipeline under its name (services.routers.vae)."""
    return ", /v1/vae/decode" + (", /v1/vae/encode, /v1/vae/interpolate" if spec.vae_encoder else "")
