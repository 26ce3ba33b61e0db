"""The OpenAI Images API over genserve's diffusion pipelines, so the official `openai` SDK
(and every tool built on it) talks to genserve unchanged:

    POST /v1/images/generations   -> txt2img (stream: true -> server-sent events)
    POST /v1/images/edits         -> img2img, or inpaint when a mask is given

A thin translation: each OpenAI body becomes the genserve request it means and runs
through the same code as /v1/txt2img, /v1/img2img and /v1/inpaint (services.routers.
diffusion), so limits, seeds, metrics, cancellation and provenance are theirs.

Translation rules (README "OpenAI-compatible Images API"):
  - `quality` -> denoising steps: low 10, medium/auto/standard 20, high/hd 40, xhigh 60, max 80; the
    genserve extension `num_inference_steps` (SDK: `extra_body`) wins over `quality`.
  - `size` "WxH" (or "auto": the model's native size) within the model's side limits.
  - `n` -> num_images (1..8), image i uses seed + i as everywhere in genserve.
  - `response_format`: b64_json only; "url" is a 400 (genserve keeps no images to link to).
  - `output_format` png/jpeg/webp; `output_compression` (0-100) is the JPEG/WebP quality.
  - `partial_images` (0-3, with `stream`): previews of the engine's x0 estimate, evenly
    spaced over the steps, sent as `image_generation.partial_image` events
    (`image_edit.partial_image` on edits), then one `*.completed` event per image.
  - edits: OpenAI's mask marks the area to edit as *transparent* (alpha 0); genserve's
    inpaint mask marks it *white*. The alpha channel is converted: alpha < 128 -> white.
    Without a mask an edit is img2img at `strength` (extension, default 0.8).
  - genserve extensions: negative_prompt, seed, num_inference_steps, guidance_scale, cache_interval,
    scheduler, strength (edits), timeout_s, lora.

Errors on /v1/images/* leave in OpenAI's shape, {"error": {"message", "type", "param",
"code"}} (plus genserve's `limit` and `request_id`), with 400 for invalid input, so the
SDK raises its typed exceptions; `OpenAIErrorShape` rewrites every error answer on these
paths, the gateway's 401/413/415/429 included. Every other path keeps genserve's shape.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from services.context import ServiceContext, context
from services.diffusion_requests import check_sides
from services.errors import InvalidRequest, ModelNotFound, ServiceError
from services.gateway import request_id_var
from services.http import EventStream, http_status, log_fault, parse_body
from services.routers import diffusion, engine_calls
from services.schemas import (
    MAX_DIFFUSION_IMAGES,
    MAX_GUIDANCE_SCALE,
    MAX_IMAGE_BASE64_CHARS,
    MAX_INFERENCE_STEPS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MIN_TIMEOUT_S,
    AdapterFields,
    Img2ImgRequest,
    InpaintRequest,
    OutputFormat,
    SchedulerName,
    Txt2ImgStreamRequest,
)

router = APIRouter(prefix="/images", tags=["OpenAI-compatible"])

PATH_PREFIX = "/v1/images/"
QUALITY_STEPS = {"low": 10, "medium": 20, "auto": 20, "standard": 20, "high": 40, "hd": 40, "xhigh": 60, "max": 80}
Quality = Literal["auto", "low", "medium", "high", "standard", "hd", "xhigh", "max"]
# What responses say: OpenAI's response `quality` takes only these (dall-e-3's names map on).
ECHOED_QUALITY = {"auto": "medium", "standard": "medium", "hd": "high"}
MAX_PARTIAL_IMAGES = 3
EDIT_STRENGTH = 0.8  # an edit without a mask: img2img this far from the input
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


# -- bodies ------------------------------------------------------------------------------
class _OpenAIImageFields(AdapterFields):  # lora: a genserve extension, as on /v1/txt2img
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw (not blank).")
    model: str | None = Field(None, description="A text-to-image pipeline served here (GET /v1/models); "
                              "default: the service's default diffusion model.")
    n: int | None = Field(1, ge=1, le=MAX_DIFFUSION_IMAGES, description="Number of images.")
    size: str | None = Field("auto", max_length=16, description="`WIDTHxHEIGHT` in pixels within the model's "
                             "side limits (GET /v1/models), or `auto`: the model's native size.")
    quality: Quality | None = Field("auto", description="Denoising steps: low 10, medium/auto/standard 20, "
                                    "high/hd 40, xhigh 60, max 80 (num_inference_steps overrides).")
    response_format: Literal["url", "b64_json"] | None = Field(
        "b64_json", description="b64_json only: `url` is refused (no images are kept to link to).")
    output_format: OutputFormat | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG/WebP quality, 0-100.")
    background: Literal["auto", "opaque"] | None = Field(None, description="Images are opaque.")
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; not stored.")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted (user's successor); not "
                                          "stored.")
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted; no moderation runs here.")
    stream: bool | None = Field(False, description="Server-sent events: partial images, then the result.")
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES,
                                       description="Previews sent while streaming (0-3).")
    # genserve extensions (the SDK's `extra_body`)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="genserve: what to steer away from.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="genserve: seed of image 0; image i uses seed + i.")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_INFERENCE_STEPS,
                                            description="genserve: denoising steps (overrides quality).")
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE_SCALE,
                                         description="genserve: guidance; default the model's (GET /v1/models).")
    scheduler: SchedulerName | None = Field(None, description="genserve: sampler; default the model's.")
    timeout_s: float | None = Field(None, ge=MIN_TIMEOUT_S, description="genserve: deadline in seconds.")
    cache_interval: int | None = Field(None, ge=1, description="genserve: DeepCache interval (1 = exact; "
                                       "GET /v1/models gives each model's maximum).")


class ImageGenerationRequest(_OpenAIImageFields):
    model_config = ConfigDict(json_schema_extra={"example": {
        "prompt": "a handwritten digit seven", "n": 1, "quality": "low", "seed": 1}})


class ImageEditRequest(_OpenAIImageFields):
    image: str = Field(max_length=MAX_IMAGE_BASE64_CHARS, description="The image to edit (a file in multipart; "
                       "base64 in JSON); its size is the output size.")
    mask: str | None = Field(None, max_length=MAX_IMAGE_BASE64_CHARS, description="PNG with alpha of the image's "
                             "size: transparent = edit (OpenAI's convention). Absent: img2img on the whole image.")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="genserve: how far from the input "
                                   "(default 0.8 without a mask, 1.0 with one).")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted; `strength` is the "
                                                          "control here.")


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int | None = Field(None, description="genserve: reproduces this image with n=1.")


class ImagesResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    quality: str
    size: str
    genserve: dict = Field(description="What reproduces the response: request_id, model, backend, every "
                           "parameter after defaults, timings.")


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    limit: int | float | str | None = None
    request_id: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error shape (on /v1/images/* only)."""

    error: OpenAIError


# -- OpenAPI ---------------------------------------------------------------------------
_ERRORS = {
    400: "Invalid input: `param` names the field (and `limit` how far it may go).",
    401: "No valid API key (only when the server has keys): the SDK's `api_key`.",
    404: "Unknown model (`param`: model) or path.",
    405: "Method not allowed.",
    408: "The request body did not arrive in time.",
    413: "The request body is too large.",
    415: "Content-Type not accepted by this endpoint.",
    429: "Rate limit or full queue: retry after `Retry-After` seconds.",
    500: "A server fault; the request id is in the server log.",
    503: "The inference backend is unavailable: retry.",
    504: "The request did not finish within its deadline.",
}
_EVENT_SCHEMA = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string", "description": "The event's JSON."}}}


def _responses() -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {200: {
        "description": "The images (JSON), or with `stream: true` server-sent events: "
                       "`*.partial_image`, then `*.completed` per image, or `error`.",
        "content": {"text/event-stream": {"schema": _EVENT_SCHEMA}}}}
    for status, text in _ERRORS.items():
        out[status] = {"model": OpenAIErrorResponse, "description": text}
        if status in (429, 503):
            out[status]["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                                      "schema": {"type": "integer"}}}
    return out


def _edit_body() -> dict:
    schema = ImageEditRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    form = {**schema, "properties": {
        k: ({"type": "string", "format": "binary", "description": v.get("description", "")}
            if k in ("image", "mask") else v) for k, v in schema["properties"].items()}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form}, "application/json": {"schema": schema}}}}


# -- endpoints -------------------------------------------------------------------------
def _generation_body() -> dict:
    # Parsed by the handler (not a typed parameter): FastAPI would document a 422, and
    # invalid input is a 400 on these routes.
    schema = ImageGenerationRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": schema, "example": schema.get("example")}}}}


@router.post("/generations", response_model=ImagesResponse, responses=_responses(), openapi_extra=_generation_body())
async def generations(request: Request, ctx: ServiceContext = Depends(context)):
    """OpenAI's image generation: text to image on a genserve diffusion pipeline."""
    body = await parse_body(request, ImageGenerationRequest)
    _check_common(body)
    name, spec = _pipeline(ctx, body.model)
    height, width = _size(body.size, spec)
    fields = _genserve_fields(body, name)
    if height is not None:
        fields.update(height=height, width=width)
    return await _run(ctx, "txt2img", body, Txt2ImgStreamRequest, fields, request, "image_generation")


@router.post("/edits", response_model=ImagesResponse, responses=_responses(), openapi_extra=_edit_body())
async def edits(request: Request, ctx: ServiceContext = Depends(context)):
    """OpenAI's image edit: img2img, or inpainting where the mask is transparent.
    Multipart (image and mask as files, as the SDK sends) or JSON (base64)."""
    body = await parse_body(request, ImageEditRequest)
    _check_common(body)
    name, spec = _pipeline(ctx, body.model)
    fields = _genserve_fields(body, name)
    fields["image"] = body.image
    model: type[Img2ImgRequest]
    if body.mask is not None:
        task, model = "inpaint", _InpaintStream
        fields["mask"] = await asyncio.to_thread(openai_mask_to_genserve, body.mask)
    else:
        task, model = "img2img", _Img2ImgStream
    fields["strength"] = body.strength if body.strength is not None else (1.0 if body.mask else EDIT_STRENGTH)
    if body.size not in (None, "auto"):  # the output is the input's size; a size that differs is refused
        height, width = _size(body.size, spec)
        fields["expected_size"] = (height, width)
    return await _run(ctx, task, body, model, fields, request, "image_edit")


class _Img2ImgStream(Img2ImgRequest):
    preview_every: int = 0


class _InpaintStream(InpaintRequest):
    preview_every: int = 0


# -- translation -----------------------------------------------------------------------
def _check_common(body: _OpenAIImageFields) -> None:
    if body.response_format == "url":
        raise InvalidRequest("response_format 'url' is not supported: images come back inline as b64_json "
                             "(genserve keeps no images to link to)", field="response_format",
                             allowed=["b64_json"])
    if body.partial_images and not body.stream:
        raise InvalidRequest("partial_images needs stream: true", field="partial_images")


def _pipeline(ctx: ServiceContext, model: str | None):
    engines = ctx.engines_of(*diffusion.TEXT_FAMILIES)
    name = ctx.model_name(model, "diffusion", engines)
    if name not in engines:
        raise ModelNotFound(f"model {name!r} is not an image pipeline served here (GET /v1/models lists them)",
                            field="model", allowed=sorted(engines))
    return name, engines[name].pipeline.spec


def _size(size: str | None, spec) -> tuple[int | None, int | None]:
    """'WxH' -> (height, width) within the model's limits; 'auto' -> (None, None)."""
    if size in (None, "auto"):
        return None, None
    match = _SIZE.match(size)
    if match is None:
        raise InvalidRequest(f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '{spec.native_width}x"
                             f"{spec.native_height}') or 'auto', got {size!r}", field="size")
    width, height = int(match[1]), int(match[2])
    check_sides(spec, height, width, field="size")
    return height, width


def _genserve_fields(body: _OpenAIImageFields, name: str) -> dict:
    fields = {"model": name, "prompt": body.prompt, "negative_prompt": body.negative_prompt,
              "num_images": body.n or 1, "output_format": body.output_format or "png",
              "num_inference_steps": body.num_inference_steps or QUALITY_STEPS[body.quality or "auto"]}
    for key in ("seed", "guidance_scale", "scheduler", "timeout_s", "cache_interval", "lora"):
        if getattr(body, key) is not None:
            fields[key] = getattr(body, key)
    return fields


def openai_mask_to_genserve(mask_b64: str) -> str:
    """OpenAI's mask (transparent = edit) -> genserve's (white = repaint), as base64 PNG."""
    from PIL import Image

    from services.imaging import NotAnAcceptedImage, open_image

    try:
        image = open_image(base64.b64decode(mask_b64, validate=True), "mask")
        image.load()
    except (ValueError, OSError, Image.DecompressionBombError):
        raise InvalidRequest("mask is not a readable PNG, JPEG or WebP image", field="mask",
                             allowed=NotAnAcceptedImage.allowed) from None
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        raise InvalidRequest("mask needs an alpha channel: its transparent pixels mark the area to edit "
                             "(OpenAI's convention)", field="mask")
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    out = io.BytesIO()
    Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


async def _run(ctx, task, body, model, fields, request: Request, event_prefix: str):
    """Submits the genserve request on the pipeline's engine; answers JSON or streams."""
    start = time.perf_counter()
    expected = fields.pop("expected_size", None)
    steps = fields["num_inference_steps"]
    partial = (body.partial_images or 0) if body.stream else 0
    if partial:  # evenly spaced previews; only the first `partial` are forwarded
        fields["preview_every"] = max(1, steps // (partial + 1))
    genserve_body = model.model_validate(fields)
    name, engine, handle, params = await diffusion._submit(ctx, task, genserve_body)
    if expected is not None and (params["height"], params["width"]) != expected:
        engine.cancel(handle)
        raise InvalidRequest(f"size {body.size} differs from the image's {params['width']}x{params['height']}: "
                             "an edit keeps the image's size (omit size or pass 'auto')", field="size")
    quality = body.quality or "auto"
    meta = dict(created=int(time.time()), quality=ECHOED_QUALITY.get(quality, quality),
                output_format=genserve_body.output_format,
                size=f"{params['width']}x{params['height']}")

    def respond() -> dict:
        out = diffusion._respond(ctx, task, name, genserve_body, params, handle, start)
        images = [_compress(im.data, genserve_body.output_format, body.output_compression) for im in out.images]
        return ImagesResponse(
            **meta, data=[ImageData(b64_json=data, seed=im.seed) for data, im in zip(images, out.images)],
            genserve={"request_id": out.request_id, "model": out.model, "backend": out.backend,
                      "task": task, "parameters": out.parameters, "timings": out.timings}).model_dump()

    if not body.stream:
        await engine_calls.wait(engine, handle, request)
        return respond()
    return _stream(ctx, engine, handle, respond, meta, partial, event_prefix)


def _compress(data: str, fmt: str, quality: int | None) -> str:
    """JPEG/WebP at `output_compression` quality (metadata kept); PNG is lossless."""
    if quality is None or fmt == "png":
        return data
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    out = io.BytesIO()
    image.save(out, format=fmt.upper(), quality=quality, exif=image.getexif())
    return base64.b64encode(out.getvalue()).decode("ascii")


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _stream(ctx, engine, handle, respond, meta: dict, partial: int, prefix: str) -> EventStream:
    """OpenAI's image stream from the engine's events: `<prefix>.partial_image` per
    preview image (the first `partial` previews), `<prefix>.completed` per final image,
    or `error` in OpenAI's shape. Closing the connection cancels the request."""
    common = {"background": "opaque", "output_format": meta["output_format"], "quality": meta["quality"],
              "size": meta["size"]}

    async def events():
        sent = 0
        while (event := await handle.events.get()) is not None:
            if event["event"] != "preview" or sent >= partial:
                continue
            encoded = ctx.encode_images(event["images"], (-1.0, 1.0), meta["output_format"],
                                        [{"preview_step": event["step"]}] * len(event["images"]))
            for i, image in enumerate(encoded):
                yield _sse(f"{prefix}.partial_image", {
                    "type": f"{prefix}.partial_image", "b64_json": image.data, "partial_image_index": sent,
                    "created_at": int(time.time()), **common, "image_index": i, "step": event["step"]})
            sent += 1
        try:
            result = await asyncio.to_thread(respond)
        except ServiceError as exc:
            log_fault(exc)
            yield _sse("error", {"type": "error", **openai_error(http_status(exc), exc.body(request_id_var.get()))})
            return
        usage = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                 "output_tokens": 0, "total_tokens": 0}
        for i, image in enumerate(result["data"]):
            yield _sse(f"{prefix}.completed", {
                "type": f"{prefix}.completed", "b64_json": image["b64_json"], "created_at": int(time.time()),
                **common, "usage": usage, "image_index": i, "seed": image["seed"], "genserve": result["genserve"]})

    return EventStream(events(), on_close=lambda: engine.cancel(handle))


# -- the error shape -------------------------------------------------------------------
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          429: "rate_limit_error"}


def openai_status(status: int) -> int:
    """genserve's 422 (invalid field) is OpenAI's 400."""
    return 400 if status == 422 else status


def openai_error(status: int, body: dict) -> dict:
    """genserve's {"error": {code, message, field?, limit?, request_id}} -> OpenAI's
    {"error": {message, type, param, code}} (limit and request_id kept)."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    out = {"message": error.get("message") or "error", "type": kind, "param": error.get("field"),
           "code": error.get("code")}
    for key in ("limit", "request_id"):
        if error.get(key) is not None:
            out[key] = error[key]
    return {"error": out}


class OpenAIErrorShape:
    """ASGI layer: error answers on /v1/images/* (from the app, the framework or the
    gateway in front of it) rewritten into OpenAI's shape; every other path untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(PATH_PREFIX):
            return await self.app(scope, receive, send)
        held: dict = {}

        async def send_rewritten(message):
            if message["type"] == "http.response.start":
                headers = dict((k.lower(), v) for k, v in message.get("headers", []))
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(b"application/json"):
                    held["start"], held["body"] = message, b""
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                start = held.pop("start")
                try:
                    payload = json.loads(held["body"])
                except ValueError:
                    payload = {}
                status = openai_status(start["status"])
                body = json.dumps(openai_error(status, payload)).encode()
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                if status >= 500 and status != 503:  # the SDK retries 5xx unless told: a 504 would run thrice
                    headers.append((b"x-should-retry", b"false"))
                await send({**start, "status": status, "headers": [*headers,
                                                                  (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_rewritten)

