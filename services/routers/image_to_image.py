"""Image -> image endpoints: `POST /v1/upscale` (super-resolution, any size, tiled) and
`POST /v1/translate` (Pix2Pix/CycleGAN-style translators), JSON (image as base64) or
multipart (image as a file); and `upscale_generated`, the super-resolution stage other
endpoints chain after generation (`"upscale": {"model": ...}`).

Images in:
- The output size (input pixels x scale^2) is checked against GENSERVE_MAX_UPSCALE_PIXELS
  from the header, before any pixel is decoded; PIL's decompression-bomb guard refuses
  absurd headers before that.
- Modes: 1/L/P/RGB/CMYK/YCbCr, with or without alpha (LA, PA, RGBA, P with transparency).
  16-bit and float modes (I, I;16, F) and other colour spaces are refused: their scaling
  to 8 bits is a choice the client should make. Animated images: the first frame.
- Alpha: the colour goes through the model; the alpha channel is resized on its own
  (bicubic, PIL) to the output size and put back (a model trained on photos has not seen
  alpha; upscaling it as colour would invent edges). A 4-channel model gets RGBA as is.
- Grey in, grey out: a grey image goes through an RGB model as three equal channels and
  comes back as the luma (ITU-R 601) of the output.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Depends, Request

from services.context import ServiceContext, context
from services.errors import InvalidRequest, ModelNotFound
from services.gateway import request_id_var
from services.http import parse_body
from services.imaging import FORMATS, NotAnAcceptedImage, open_image
from services.memory import trim
from services.openapi import body_schema, error_responses
from services.schemas import (
    MAX_TILE,
    MAX_TILE_OVERLAP,
    MIN_TILE,
    DiffusionResponse,
    ModelDescription,
    TranslateRequest,
    UpscaleRequest,
    tensors,
)

router = APIRouter()


def _documented(model) -> dict:
    """The JSON-or-multipart body, with a working JSON example: a small grey PNG for the
    model served by default (clients and the fuzzer see a request that succeeds)."""
    extra = body_schema(model)
    content = extra["requestBody"]["content"]
    content["application/json"]["example"] = {"image": _EXAMPLE_PNG}
    # The form documents the file only: an optional form field sent as an empty list is no
    # field at all on the wire, so a schema fuzzer's "invalid" value for it is a valid request
    # (the defaults). The other fields are the JSON body's, sent as form fields.
    form = content["multipart/form-data"]["schema"]
    content["multipart/form-data"]["schema"] = {
        "type": "object", "required": ["image"], "properties": {"image": form["properties"]["image"]},
        "description": "The image as a file; model, output_format, tile and tile_overlap as form fields, as in "
                       "the JSON body."}
    return extra


# A 24x24 grey PNG, base64.
_EXAMPLE_PNG = ("iVBORw0KGgoAAAANSUhEUgAAABgAAAAYCAAAAADFHGIkAAAAFklEQVR4nGNsYMAOmHCIj0qMShAhAQBmJwCwf4V22QAAAABJRU5E"
                "rkJggg==")

ACCEPTED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
ENDPOINTS = {"super_resolution": "/v1/upscale", "restoration": "/v1/upscale", "translation": "/v1/translate"}


@router.post("/upscale", response_model=DiffusionResponse, responses=error_responses(),
             openapi_extra=_documented(UpscaleRequest))
async def upscale(request: Request, ctx: ServiceContext = Depends(context)) -> DiffusionResponse:
    """An image of any size (up to the output limit) x the model's scale, in overlapping tiles."""
    body = await parse_body(request, UpscaleRequest)
    return await _serve(ctx, body, "/v1/upscale")


@router.post("/translate", response_model=DiffusionResponse, responses=error_responses(),
             openapi_extra=_documented(TranslateRequest))
async def translate(request: Request, ctx: ServiceContext = Depends(context)) -> DiffusionResponse:
    """An image through an image-to-image translator (Pix2Pix, CycleGAN, style transfer)."""
    body = await parse_body(request, TranslateRequest)
    return await _serve(ctx, body, "/v1/translate")


async def _serve(ctx: ServiceContext, body: UpscaleRequest, endpoint: str) -> DiffusionResponse:
    start = time.perf_counter()
    # 1. Check inputs: the model, the tiling, then the image's header (before decoding).
    name, pipeline = pick_model(ctx, body.model, endpoint)
    info = pipeline.info
    tile, overlap = check_tiling(info, body.tile, body.tile_overlap)
    decoded = await asyncio.to_thread(decode_upload, body.image, "image", info,
                                      ctx.settings.images.max_upscale_pixels)
    if decoded.alpha is not None and body.output_format == "jpeg":
        raise InvalidRequest("the image has an alpha channel and JPEG has none: ask for png or webp",
                             field="output_format", allowed=["png", "webp"])
    h, w = decoded.pixels.shape[1:]
    check_work(ctx, pipeline, pipeline.layout(h, w, tile, overlap), body.tile is not None)
    # 2. The model, in tiles.
    try:
        out = await pipeline(decoded.pixels, tile, overlap)
        tiles, inference_seconds = out.tiles, out.inference_seconds
        image = await asyncio.to_thread(compose, out.image, decoded, info)
        del out, decoded
        # 3. Encode with provenance.
        meta = {"model": name, "version": pipeline.spec.version, "task": info.task, "scale": info.scale,
                "source_size": [w, h]}
        images = await asyncio.to_thread(ctx.encode_images, image[None], info.output_range, body.output_format,
                                         [meta])
        del image
    finally:
        await asyncio.to_thread(trim)  # the canvases' pages go back to the system, not to the heap's free list
    task = "upscale" if endpoint == "/v1/upscale" else "translate"
    total = ctx.record(task, name, 1, start)
    return DiffusionResponse(
        request_id=request_id_var.get(), model=name, backend=ctx.backend.name,
        parameters={"output_format": body.output_format, "tile": tile, "tile_overlap": overlap, "scale": info.scale,
                    "tiles": tiles, "input_size": [w, h], "output_size": [w * info.scale, h * info.scale],
                    "model_version": pipeline.spec.version},
        images=images,
        timings={"inference_seconds": round(inference_seconds, 6), "total_seconds": round(total, 6)})


# -- helpers ---------------------------------------------------------------------------
def served(ctx: ServiceContext, endpoint: str) -> dict:
    return {n: p for n, p in ctx.image_to_image.items() if ENDPOINTS.get(p.info.task) == endpoint}


def example_models(ctx: ServiceContext) -> dict[str, str]:
    """{endpoint: the first served model}, for the documented examples."""
    models: dict[str, str] = {}
    for name, pipeline in sorted(ctx.image_to_image.items()):
        endpoint = ENDPOINTS.get(pipeline.info.task)
        if endpoint is not None:
            models.setdefault(endpoint, name)
    return models


def pick_model(ctx: ServiceContext, model: str | None, endpoint: str, field: str = "model"):
    models = served(ctx, endpoint)
    kind = "super-resolution model" if endpoint == "/v1/upscale" else "image-to-image translator"
    if model is None:
        if len(models) == 1:
            return next(iter(models.items()))
        raise InvalidRequest(f"name the {kind} to use ({len(models)} served)", field=field, allowed=sorted(models))
    if model not in models:
        raise ModelNotFound(f"model {model!r} is not a {kind} served here", field=field, allowed=sorted(models))
    return model, models[model]


def check_tiling(info, tile: int | None, overlap: int | None) -> tuple[int, int]:
    tile = info.tile if tile is None else tile
    overlap = info.tile_overlap if overlap is None else overlap
    if not info.tile_ok(tile):
        raise InvalidRequest(f"tile must be a multiple of {info.size_multiple} and at least {info.size_minimum} for "
                             f"this model (and {MIN_TILE} to {MAX_TILE}), got {tile}", field="tile",
                             limit=info.size_multiple)
    most = min(MAX_TILE_OVERLAP, (tile - 1) // 2)
    if overlap > most:
        raise InvalidRequest(f"tile_overlap must be less than half the tile ({tile}), got {overlap}",
                             field="tile_overlap", limit=most)
    return tile, overlap


def check_work(ctx: ServiceContext, pipeline, layout, tile_asked: bool = True, images: int = 1) -> None:
    """Before any model call: the request's bounds for its `images` images of this layout (a
    chained upscale runs them all at once), each a 422 naming the limit, then the memory they
    need against GENSERVE_MEMORY_LIMIT_MB (503)."""
    settings = ctx.settings
    budget = settings.images.call_mb << 20
    row = pipeline.call_bytes(layout)
    if row is not None and row > budget:
        fit = int(layout.th * (budget / row) ** 0.5) // pipeline.info.size_multiple * pipeline.info.size_multiple
        raise InvalidRequest(
            f"a {layout.th}x{layout.tw} tile needs about {row >> 20} MB of model memory per call, more than "
            f"GENSERVE_IMAGE_CALL_MB={settings.images.call_mb}: use tile <= {max(fit, MIN_TILE)}",
            field="tile" if tile_asked else "image", limit=max(fit, MIN_TILE))
    per_image = pipeline.work_seconds(layout)
    if settings.images.max_work_s and per_image is not None and per_image * images > settings.images.max_work_s:
        what = (f"this image is {layout.tiles} tiles" if images == 1
                else f"{images} images of {layout.tiles} tiles each are {images * layout.tiles} tiles")
        fewer = "send a smaller image" if images == 1 else "ask for fewer images or upscale them one request at a time"
        raise InvalidRequest(
            f"{what} of {layout.th}x{layout.tw}: about {per_image * images:.0f}s of model work at the measured "
            f"cost, more than GENSERVE_MAX_IMAGE_WORK_S={settings.images.max_work_s}: {fewer}",
            field="image" if images == 1 else "num_images", limit=settings.images.max_work_s)
    if ctx.memory is not None:
        task = f"{layout.tiles}-tile {pipeline.info.task.replace('_', ' ')}"
        ctx.memory.check(f"a {task}" if images == 1 else f"{images} images' {task}",
                         pipeline.canvas_bytes(layout) * images
                         + min(budget, row or 0) * pipeline.rows_per_call(layout))


@dataclass
class DecodedImage:
    pixels: np.ndarray  # [C_in, H, W] float32 in the model's input range
    alpha: np.ndarray | None  # [H, W] uint8, when the image had alpha and the model takes none
    grey: bool  # the image was grey (no colour): the output goes back to grey


def decode_upload(data: str, field: str, info, max_output_pixels: int) -> DecodedImage:
    """Base64 image -> model input. Refuses, naming `field`: bad base64, undecodable bytes,
    an output past `max_output_pixels` (from the header, before decoding), unsupported modes."""
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise InvalidRequest(f"{field} is not valid base64", field=field) from None
    try:
        image = open_image(raw, field)
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{field} claims more pixels than any output allowed here "
                             f"({max_output_pixels} output pixels)", field=field, limit=max_output_pixels) from None
    except NotAnAcceptedImage as exc:
        raise InvalidRequest(str(exc), field=field, allowed=exc.allowed) from None
    w, h = image.size
    s = info.scale
    if w * h * s * s > max_output_pixels:
        most = int((max_output_pixels / (s * s)) ** 0.5)
        raise InvalidRequest(f"{field} is {w}x{h}: x{s} gives {w * s}x{h * s} = {w * h * s * s} pixels, more than "
                             f"the {max_output_pixels} allowed (GENSERVE_MAX_UPSCALE_PIXELS; e.g. at most "
                             f"{most}x{most} in)", field=field, limit=max_output_pixels)
    if image.mode not in ACCEPTED_MODES:
        raise InvalidRequest(f"{field} has pixel mode {image.mode!r} (16-bit, float or another colour space): send "
                             "8-bit grey, RGB or RGBA (with or without alpha)", field=field,
                             allowed=list(ACCEPTED_MODES))
    try:
        image.seek(0)
        image.load()
    except Exception as exc:
        raise InvalidRequest(f"{field} is not a decodable PNG/JPEG/WebP image ({type(exc).__name__})",
                             field=field) from None
    has_alpha = image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    grey = image.mode in ("1", "L", "LA", "La")
    alpha = None
    if has_alpha and info.input_channels != 4:
        alpha = np.asarray(image.convert("RGBA"))[..., 3].copy()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[info.input_channels]
    pixels = np.asarray(image.convert(mode), dtype=np.float32)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    low, high = info.input_range
    return DecodedImage(pixels * ((high - low) / 255.0) + low, alpha, grey and info.input_channels != 1)


def compose(out: np.ndarray, decoded: DecodedImage, info) -> np.ndarray:
    """The model's output [C_out, sH, sW] -> what is sent back: grey again for a grey input,
    with the input's alpha resized beside it (both in the model's output range)."""
    if decoded.grey and out.shape[0] == 3 and decoded.alpha is None:
        out = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2])[None]
    if decoded.alpha is not None:
        out = with_alpha(out, decoded.alpha, info.output_range)
    return out


def with_alpha(out: np.ndarray, alpha: np.ndarray, value_range) -> np.ndarray:
    from PIL import Image

    _, h, w = out.shape
    if out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    resized = np.asarray(Image.fromarray(alpha).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    low, high = value_range
    return np.concatenate([out, (resized * ((high - low) / 255.0) + low)[None]])


def describe(ctx: ServiceContext) -> list[ModelDescription]:
    models = []
    for name, pipeline in ctx.image_to_image.items():
        spec, info = pipeline.spec, pipeline.info
        models.append(ModelDescription(
            name=name, version=spec.version, pipeline=f"image_to_image/{info.task}",
            endpoint=ENDPOINTS.get(info.task, "/v1/upscale"), backend=ctx.backend.name,
            max_batch_size=spec.max_batch_size, inputs=tensors(spec.inputs), outputs=tensors(spec.outputs),
            parameters={"scale": info.scale, "architecture": info.architecture,
                        "input_channels": info.input_channels, "output_channels": info.output_channels,
                        "max_output_pixels": ctx.settings.images.max_upscale_pixels,
                        "tile": {"default": info.tile, "min": max(MIN_TILE, info.size_minimum), "max": MAX_TILE,
                                 "multiple_of": info.size_multiple},
                        "tile_overlap": {"default": info.tile_overlap, "min": 0, "max": MAX_TILE_OVERLAP},
                        "output_format": sorted(FORMATS),
                        **({"license": info.license} if info.license else {})},
        ))
    return models


# -- chained after generation: "upscale": {"model": ...} on the generating endpoints -------
def check_upscale(ctx: ServiceContext, stage, height: int, width: int, images: int):
    """Before anything is generated: the stage's model is served, each upscaled image fits
    GENSERVE_MAX_UPSCALE_PIXELS and the request's `images` fit the work and memory bounds.
    Returns (name, pipeline)."""
    name, pipeline = pick_model(ctx, stage.model, "/v1/upscale", field="upscale.model")
    s, most = pipeline.info.scale, ctx.settings.images.max_upscale_pixels
    if height * width * s * s > most:
        raise InvalidRequest(f"{width}x{height} images x{s} ({name}) would be {width * s}x{height * s} = "
                             f"{height * width * s * s} pixels, more than the {most} allowed "
                             f"(GENSERVE_MAX_UPSCALE_PIXELS)", field="upscale.model", limit=most)
    check_work(ctx, pipeline, pipeline.layout(height, width), tile_asked=False, images=images)
    return name, pipeline


async def upscale_generated(pipeline, images: np.ndarray, value_range) -> tuple[np.ndarray, float]:
    """Generated [N, C, H, W] in `value_range` -> [N, C, sH, sW] in the SR model's output range,
    all images at once (their tiles share model calls). Grey images go through an RGB model
    as three equal channels and come back grey, as on /v1/upscale."""
    info = pipeline.info
    low, high = value_range
    x = np.clip((images.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    c = x.shape[1]
    if info.input_channels == 3 and c == 1:
        x = np.repeat(x, 3, axis=1)
    elif info.input_channels == 1 and c == 3:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    elif info.input_channels != x.shape[1]:
        raise InvalidRequest(f"the generator makes {c}-channel images; the super-resolution model takes "
                             f"{info.input_channels}", field="upscale.model")
    in_low, in_high = info.input_range
    x = x * (in_high - in_low) + in_low
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(pipeline(image) for image in x))
    seconds = time.perf_counter() - t0
    out = np.stack([o.image for o in outs])
    if c == 1 and out.shape[1] == 3:
        out = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2])[:, None]
    return out, seconds


async def chain(ctx: ServiceContext, stage, images: np.ndarray, value_range, fmt: str, metas: list[dict],
                params: dict, timings: dict):
    """Runs the upscale stage when asked: returns (images, value range, output format) to encode,
    with provenance naming both models in `metas`, the stage in `params`, its seconds in `timings`."""
    if stage is None:
        return images, value_range, fmt
    height, width = images.shape[2:]
    name, pipeline = check_upscale(ctx, stage, height, width, images=len(images))
    images, seconds = await upscale_generated(pipeline, images, value_range)
    fmt = stage.output_format or fmt
    for meta in metas:
        meta.update(upscaled_by=name, upscaled_by_version=pipeline.spec.version, upscale=pipeline.info.scale)
    params["upscale"] = {"model": name, "scale": pipeline.info.scale, "output_format": fmt}
    timings["upscale_seconds"] = round(seconds, 6)
    ctx.record("upscale", name, len(images), time.perf_counter() - seconds)
    return images, pipeline.info.output_range, fmt
