"""StyleGAN-style models and their W space: `/v1/gan/generate` (truncation in W), and
`POST /v1/gan/mix`, `/v1/gan/interpolate`, `/v1/gan/latents`, `/v1/gan/synthesize`,
`/v1/gan/edit`. Every image says how to reproduce it (seed, labels, psi, operation)."""

from __future__ import annotations

import base64
import time

import numpy as np
from fastapi import APIRouter, Depends

from services.context import ServiceContext, context
from services.errors import InvalidRequest, ModelNotFound
from services.gateway import request_id_var
from services.imaging import ANIMATIONS, FORMATS, encode_animation, to_uint8
from services.openapi import error_responses
from services.routers import image_to_image
from services.schemas import (
    MAX_FRAMES,
    MAX_IMAGES_PER_REQUEST,
    MAX_INTERPOLATION_SEEDS,
    MAX_SEED,
    GANEditRequest,
    GANGenerateRequest,
    GANGenerateResponse,
    GANInterpolateRequest,
    GANLatentsRequest,
    GANLatentsResponse,
    GANMixRequest,
    GANSynthesizeRequest,
    GeneratedImage,
    ModelDescription,
    WTensor,
    check_class_label,
    resolve_seed,
    tensors,
)
from services.tensors import decode_tensor, encode_tensor

router = APIRouter()


async def generate(ctx: ServiceContext, name: str, body: GANGenerateRequest) -> GANGenerateResponse:
    """`/v1/gan/generate` on a StyleGAN model (the gan router hands it over)."""
    start = time.perf_counter()
    g = ctx.stylegan[name]
    check_class_label(name, body.class_label, g.info.c_dim, "class_label")
    seed = resolve_seed(body.seed, body.num_images)
    if body.upscale is not None:  # refused before generating, not after
        image_to_image.check_upscale(ctx, body.upscale, g.info.image_height, g.info.image_width, body.num_images)
    seeds = [seed + i for i in range(body.num_images)]
    w, labels = await g.seeds_to_w(seeds, [body.class_label] * body.num_images, body.truncation_psi)
    images = await g.synthesis(g.broadcast(w))
    metas = [{"seed": s, "class_label": label, "truncation_psi": body.truncation_psi}
             for s, label in zip(seeds, labels)]
    params = {**body.model_dump(exclude={"model", "upscale"}), "seed": seed}
    timings: dict[str, float] = {}
    images, value_range, fmt = await image_to_image.chain(ctx, body.upscale, images, g.info.output_range,
                                                          body.output_format, metas, params, timings)
    return _respond(ctx, "gan", name, images, metas, fmt, start, params, value_range, timings)


@router.post("/gan/mix", response_model=GANGenerateResponse, responses=error_responses())
async def mix(body: GANMixRequest, ctx: ServiceContext = Depends(context)) -> GANGenerateResponse:
    """Style mixing: layers before `crossover` from `seed`, the rest from `style_seed`."""
    start = time.perf_counter()
    name, g = _model(ctx, body.model)
    check_class_label(name, body.class_label, g.info.c_dim, "class_label")
    check_class_label(name, body.style_class_label, g.info.c_dim, "style_class_label")
    crossover = g.info.num_ws // 2 if body.crossover is None else body.crossover
    if crossover > g.info.num_ws:
        raise InvalidRequest(f"crossover must be at most num_ws={g.info.num_ws}", field="crossover",
                             limit=g.info.num_ws)
    w, labels = await g.seeds_to_w([body.seed, body.style_seed], [body.class_label, body.style_class_label],
                                   body.truncation_psi)
    ws = g.broadcast(w)
    mixed = g.mix(ws[:1], ws[1:], crossover)
    batch = np.concatenate([mixed, ws]) if body.include_sources else mixed
    images = await g.synthesis(batch)
    common = {"truncation_psi": body.truncation_psi}
    metas = [{"operation": "mix", "seed": body.seed, "style_seed": body.style_seed, "class_label": labels[0],
              "style_class_label": labels[1], "crossover": crossover, **common}]
    if body.include_sources:
        metas += [{"seed": body.seed, "class_label": labels[0], **common},
                  {"seed": body.style_seed, "class_label": labels[1], **common}]
    return _respond(ctx, "gan_mix", name, images, metas, body.output_format, start,
                    {**body.model_dump(exclude={"model"}), "crossover": crossover, "class_label": labels[0],
                     "style_class_label": labels[1]})


@router.post("/gan/interpolate", response_model=GANGenerateResponse, responses=error_responses())
async def interpolate(body: GANInterpolateRequest, ctx: ServiceContext = Depends(context)) -> GANGenerateResponse:
    """Frames between consecutive seeds, in Z (slerp) or W (lerp); the first and last frames
    are the seeds' /v1/gan/generate images. Frames, or one animated GIF/WebP."""
    start = time.perf_counter()
    name, g = _model(ctx, body.model)
    labels = _labels(g, name, body.class_labels, len(body.seeds))
    if body.space == "w":
        w, used = await g.seeds_to_w(body.seeds, labels, body.truncation_psi)
        ws = g.broadcast(g.w_line(w, body.frames))
    else:
        used = [g.seed_latents(s, label)[1] for s, label in zip(body.seeds, labels)]
        ws = await g.z_line(body.seeds, used, body.frames, body.truncation_psi)
    images = await g.synthesis(ws)
    params = {**body.model_dump(exclude={"model"}), "class_labels": used}
    meta = {"operation": "interpolate", "seeds": body.seeds, "class_labels": used, "space": body.space,
            "frames": body.frames, "truncation_psi": body.truncation_psi}
    if body.output_format in ANIMATIONS:
        pixels = to_uint8(images, *g.info.output_range)
        data = encode_animation(pixels, body.output_format, {"model": name, **meta})
        animation = GeneratedImage(index=0, media_type=ANIMATIONS[body.output_format], width=pixels.shape[2],
                                   height=pixels.shape[1], data=base64.b64encode(data).decode("ascii"))
        total = ctx.record("gan_interpolate", name, len(images), start)
        return GANGenerateResponse(request_id=request_id_var.get(), model=name, model_version=g.info.version,
                                   backend=ctx.backend.name, parameters=params, images=[animation],
                                   timings={"total_seconds": round(total, 6)})
    metas = [{**meta, "frame": i} for i in range(len(images))]
    return _respond(ctx, "gan_interpolate", name, images, metas, body.output_format, start, params)


@router.post("/gan/latents", response_model=GANLatentsResponse, responses=error_responses())
async def latents(body: GANLatentsRequest, ctx: ServiceContext = Depends(context)) -> GANLatentsResponse:
    """Seeds -> their w [N, w_dim] (truncated as asked), for clients' own editing."""
    name, g = _model(ctx, body.model)
    labels = _labels(g, name, body.class_labels, len(body.seeds))
    w, used = await g.seeds_to_w(body.seeds, labels, body.truncation_psi)
    return GANLatentsResponse(request_id=request_id_var.get(), model=name, backend=ctx.backend.name,
                              parameters={**body.model_dump(exclude={"model"}), "class_labels": used},
                              w=WTensor(**encode_tensor(w)))


@router.post("/gan/synthesize", response_model=GANGenerateResponse, responses=error_responses())
async def synthesize(body: GANSynthesizeRequest, ctx: ServiceContext = Depends(context)) -> GANGenerateResponse:
    """w [N, w_dim] or ws [N, num_ws, w_dim] -> images."""
    start = time.perf_counter()
    name, g = _model(ctx, body.model)
    shape, info = body.w.shape, g.info
    expected = "[N, w_dim] or [N, num_ws, w_dim]"
    if shape[-1] != info.w_dim or (len(shape) == 3 and shape[1] != info.num_ws):
        raise InvalidRequest(f"w has shape {shape}; model {name!r} takes {expected} with w_dim={info.w_dim}, "
                             f"num_ws={info.num_ws}", field="w.shape")
    if shape[0] > MAX_IMAGES_PER_REQUEST:
        raise InvalidRequest(f"w holds {shape[0]} images; at most {MAX_IMAGES_PER_REQUEST}", field="w.shape",
                             limit=MAX_IMAGES_PER_REQUEST)
    w = decode_tensor(shape, body.w.data, "w")
    images = await g.synthesis(g.broadcast(w) if w.ndim == 2 else w)
    return _respond(ctx, "gan_synthesize", name, images, [{"operation": "synthesize"}] * len(images),
                    body.output_format, start, {"shape": shape, "output_format": body.output_format})


@router.post("/gan/edit", response_model=GANGenerateResponse, responses=error_responses())
async def edit(body: GANEditRequest, ctx: ServiceContext = Depends(context)) -> GANGenerateResponse:
    """The seed's w moved by `strength` along a stored direction."""
    start = time.perf_counter()
    name, g = _model(ctx, body.model)
    if body.direction not in g.info.directions:
        raise InvalidRequest(f"model {name!r} has no direction {body.direction!r}", field="direction",
                             allowed=sorted(g.info.directions))
    check_class_label(name, body.class_label, g.info.c_dim, "class_label")
    w, labels = await g.seeds_to_w([body.seed], [body.class_label], body.truncation_psi)
    edited = (w + np.float32(body.strength) * g.info.directions[body.direction]).astype(np.float32)
    images = await g.synthesis(g.broadcast(edited))
    meta = {"operation": "edit", "seed": body.seed, "class_label": labels[0], "direction": body.direction,
            "strength": body.strength, "truncation_psi": body.truncation_psi}
    return _respond(ctx, "gan_edit", name, images, [meta], body.output_format, start,
                    {**body.model_dump(exclude={"model"}), "class_label": labels[0]})


# -- helpers ---------------------------------------------------------------------------
def _model(ctx: ServiceContext, model: str | None):
    """The named StyleGAN model; unnamed: the default GAN model if it is one, else the only one."""
    name = model or ctx.settings.defaults.gan
    if model is None and name not in ctx.stylegan:
        name = next(iter(ctx.stylegan)) if len(ctx.stylegan) == 1 else ctx.model_name(None, "gan", ctx.stylegan)
    if name not in ctx.stylegan:
        raise ModelNotFound(f"model {name!r} is not a StyleGAN model served here", field="model",
                            allowed=sorted(ctx.stylegan))
    return name, ctx.stylegan[name]


def _labels(g, name: str, labels: list[int] | None, count: int) -> list[int | None]:
    if labels is None:
        return [None] * count
    if len(labels) != count:
        raise InvalidRequest(f"class_labels has {len(labels)} entries for {count} seeds: one per seed",
                             field="class_labels")
    for label in labels:
        check_class_label(name, label, g.info.c_dim, "class_labels")
    return list(labels)


def _respond(ctx: ServiceContext, task: str, name: str, images: np.ndarray, metas: list[dict], fmt: str,
             start: float, params: dict, value_range=None, timings: dict | None = None) -> GANGenerateResponse:
    """`value_range`: the images' (the generator's output range unless an upscale stage ran)."""
    g = ctx.stylegan[name]
    encoded = ctx.encode_images(images, value_range or g.info.output_range, fmt,
                                [{"model": name, "version": g.info.version, **m} for m in metas])
    for image, meta in zip(encoded, metas):
        image.class_label = meta.get("class_label")
    total = ctx.record(task, name, len(encoded), start)
    return GANGenerateResponse(request_id=request_id_var.get(), model=name, model_version=g.info.version,
                               backend=ctx.backend.name, parameters=params, images=encoded,
                               timings={**(timings or {}), "total_seconds": round(total, 6)})


def describe(ctx: ServiceContext) -> list[ModelDescription]:
    models = []
    for name, g in ctx.stylegan.items():
        info = g.info
        synthesis = ctx.backend.models()[info.synthesis]
        params = {
            "num_images": {"min": 1, "max": MAX_IMAGES_PER_REQUEST}, "seed": {"min": 0, "max": MAX_SEED},
            "truncation_psi": {"min": 0.0, "max": 1.0}, "output_format": sorted(FORMATS),
            "z_dim": info.z_dim, "w_dim": info.w_dim, "num_ws": info.num_ws,
            "crossover": {"min": 0, "max": info.num_ws},
            "directions": sorted(info.directions), "frames": {"min": 2, "max": MAX_FRAMES},
            "seeds": {"min": 2, "max": MAX_INTERPOLATION_SEEDS},
        }
        if info.c_dim:
            params["class_label"] = {"min": 0, "max": info.c_dim - 1}
        models.append(ModelDescription(
            name=name, version=info.version, pipeline="stylegan",
            endpoint="/v1/gan/generate, /v1/gan/mix, /v1/gan/interpolate, /v1/gan/latents, /v1/gan/synthesize, "
                     "/v1/gan/edit",
            backend=ctx.backend.name, max_batch_size=synthesis.max_batch_size,
            inputs=tensors(synthesis.inputs), outputs=tensors(synthesis.outputs), parameters=params))
    return models
