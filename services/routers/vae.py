"""VAE endpoints: `POST /v1/vae/encode`, `/v1/vae/decode`, `/v1/vae/sample`,
`/v1/vae/interpolate`, for standalone VAEs and every latent pipeline's VAE (by its name).

Latents travel as {"shape": [N, C, h, w], "datatype": "FP32", "data": base64 of
little-endian float32}, in the VAE's own latent space."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from fastapi import APIRouter, Depends, Request

from services.context import ServiceContext, context
from services.diffusion_requests import decode_field
from services.errors import InvalidRequest, ModelNotFound
from services.gateway import request_id_var
from services.http import parse_body
from services.imaging import FORMATS
from services.openapi import body_schema, error_responses
from services.schemas import (
    MAX_FRAMES,
    MAX_IMAGES_PER_REQUEST,
    MAX_SEED,
    DiffusionResponse,
    LatentTensor,
    ModelDescription,
    VAEDecodeRequest,
    VAEEncodeRequest,
    VAEEncodeResponse,
    VAEInterpolateRequest,
    VAESampleRequest,
    resolve_seed,
    tensors,
)
from services.tensors import decode_tensor, encode_tensor

router = APIRouter()


@router.post("/vae/encode", response_model=VAEEncodeResponse, responses=error_responses(),
             openapi_extra=body_schema(VAEEncodeRequest))
async def vae_encode(request: Request, ctx: ServiceContext = Depends(context)) -> VAEEncodeResponse:
    """An image -> its latent: the posterior mean, or a sample drawn from `seed`."""
    start = time.perf_counter()
    body = await parse_body(request, VAEEncodeRequest)
    name, vae = _vae(ctx, body.model, need_encoder=True)
    if body.seed is not None and not body.sample:
        raise InvalidRequest("seed draws a posterior sample: set sample to true, or omit seed", field="seed")
    image = await asyncio.to_thread(_image, vae, body.image, "image")
    seed = resolve_seed(body.seed, 1) if body.sample else None
    latent = await vae.encode(image, seed)
    total = ctx.record("vae_encode", name, 1, start)
    return VAEEncodeResponse(request_id=request_id_var.get(), model=name, backend=ctx.backend.name,
                             parameters={"sample": body.sample, "seed": seed}, latent=to_tensor(latent),
                             timings={"total_seconds": round(total, 6)})


@router.post("/vae/decode", response_model=DiffusionResponse, responses=error_responses())
async def vae_decode(body: VAEDecodeRequest, ctx: ServiceContext = Depends(context)) -> DiffusionResponse:
    """Latents -> images."""
    start = time.perf_counter()
    name, vae = _vae(ctx, body.model)
    latents = from_tensor(body.latent, vae)
    images = await vae.decode(latents)
    return _images(ctx, "vae_decode", name, images, [None] * len(images), body.output_format, start,
                   {"shape": body.latent.shape})


@router.post("/vae/sample", response_model=DiffusionResponse, responses=error_responses())
async def vae_sample(body: VAESampleRequest, ctx: ServiceContext = Depends(context)) -> DiffusionResponse:
    """Decoded N(0, I) latents at the native size: image i from default_rng(seed + i)."""
    start = time.perf_counter()
    name, vae = _vae(ctx, body.model, standalone=True)
    seed = resolve_seed(body.seed, body.num_images)
    images = await vae.decode(vae.prior_latents(seed, body.num_images))
    return _images(ctx, "vae_sample", name, images, [seed + i for i in range(body.num_images)],
                   body.output_format, start, {"seed": seed, "num_images": body.num_images})


@router.post("/vae/interpolate", response_model=DiffusionResponse, responses=error_responses(),
             openapi_extra=body_schema(VAEInterpolateRequest))
async def vae_interpolate(request: Request, ctx: ServiceContext = Depends(context)) -> DiffusionResponse:
    """`frames` images along the straight latent line between two images (their posterior
    means) or two seeds (N(0, I) latents, standalone VAEs)."""
    start = time.perf_counter()
    body = await parse_body(request, VAEInterpolateRequest)
    params: dict[str, object]
    if body.image_a is not None and body.image_b is not None and body.seed_a is None and body.seed_b is None:
        name, vae = _vae(ctx, body.model, need_encoder=True)
        a = await asyncio.to_thread(_image, vae, body.image_a, "image_a")
        b = await asyncio.to_thread(_image, vae, body.image_b, "image_b")
        if a.shape != b.shape:
            raise InvalidRequest(f"image_b is {b.shape[2]}x{b.shape[1]} but image_a is {a.shape[2]}x{a.shape[1]}: "
                                 "they must match", field="image_b")
        za, zb = await vae.encode(a), await vae.encode(b)
        params = {"ends": "images"}
    elif body.seed_a is not None and body.seed_b is not None and body.image_a is None and body.image_b is None:
        name, vae = _vae(ctx, body.model, standalone=True)
        za, zb = vae.prior_latents(body.seed_a, 1), vae.prior_latents(body.seed_b, 1)
        params = {"ends": "seeds", "seed_a": body.seed_a, "seed_b": body.seed_b}
    else:
        raise InvalidRequest("give both image_a and image_b, or both seed_a and seed_b", field="image_a")
    images = await vae.decode(vae.line(za[0], zb[0], body.frames))
    return _images(ctx, "vae_interpolate", name, images, [None] * body.frames, body.output_format, start,
                   {**params, "frames": body.frames})


# -- helpers ---------------------------------------------------------------------------
def _vae(ctx: ServiceContext, model: str | None, need_encoder: bool = False, standalone: bool = False):
    name = ctx.model_name(model, "vae", ctx.vae)
    if name not in ctx.vae:
        raise ModelNotFound(f"model {name!r} is not a VAE served here", field="model", allowed=sorted(ctx.vae))
    vae = ctx.vae[name]
    if need_encoder and vae.info.encoder is None:
        raise InvalidRequest(f"model {name!r} has no VAE encoder", field="model")
    if standalone and not vae.info.standalone:
        raise InvalidRequest(f"model {name!r} is the VAE of a {vae.info.family} pipeline: its latent space is "
                             "not N(0, I); sampling needs a standalone VAE",
                             field="model", allowed=sorted(n for n, v in ctx.vae.items() if v.info.standalone))
    return name, vae


def _image(vae, data: str, field: str) -> np.ndarray:
    image = decode_field(data, vae.info.image_channels, field, vae.info.max_side)
    m = vae.info.size_multiple
    if image.shape[1] % m or image.shape[2] % m:
        raise InvalidRequest(f"{field} is {image.shape[2]}x{image.shape[1]}: sides must be multiples of {m}",
                             field=field, limit=m)
    return image


def to_tensor(x: np.ndarray) -> LatentTensor:
    return LatentTensor(**encode_tensor(x))


def from_tensor(t: LatentTensor, vae) -> np.ndarray:
    """The tensor's float32s, checked against the VAE (channels, sides, batch, finiteness)."""
    n, c, h, w = t.shape
    info = vae.info
    if c != info.latent_channels:
        raise InvalidRequest(f"latent has {c} channels; model {info.name!r} takes {info.latent_channels}",
                             field="latent.shape", limit=info.latent_channels)
    if n > MAX_IMAGES_PER_REQUEST:
        raise InvalidRequest(f"latent holds {n} images; at most {MAX_IMAGES_PER_REQUEST}", field="latent.shape",
                             limit=MAX_IMAGES_PER_REQUEST)
    most = info.max_side // info.scale_factor
    if max(h, w) > most:
        raise InvalidRequest(f"latent sides may be at most {most}, got {h}x{w}", field="latent.shape", limit=most)
    return decode_tensor(t.shape, t.data, "latent")


def _images(ctx: ServiceContext, task: str, name: str, images: np.ndarray, seeds: list, fmt: str, start: float,
            params: dict) -> DiffusionResponse:
    encoded = ctx.encode_images(images, (-1.0, 1.0), fmt, [{"model": name, "task": task, "seed": s} for s in seeds])
    total = ctx.record(task, name, len(encoded), start)
    return DiffusionResponse(request_id=request_id_var.get(), model=name, backend=ctx.backend.name,
                             parameters={**params, "output_format": fmt}, images=encoded,
                             timings={"total_seconds": round(total, 6)})


def describe(ctx: ServiceContext) -> list[ModelDescription]:
    models = []
    for name, vae in ctx.vae.items():
        info = vae.info
        if not info.standalone:
            continue  # a pipeline's VAE is listed with its pipeline; its endpoints are named there too
        dec = ctx.backend.models()[info.decoder]
        models.append(ModelDescription(
            name=name, version=dec.version, pipeline="vae",
            endpoint="/v1/vae/encode, /v1/vae/decode, /v1/vae/sample, /v1/vae/interpolate",
            backend=ctx.backend.name, max_batch_size=dec.max_batch_size,
            inputs=tensors(dec.inputs), outputs=tensors(dec.outputs),
            parameters={"latent_shape": list(info.native_latent), "scale_factor": info.scale_factor,
                        "image_channels": info.image_channels, "native_size": info.native_size,
                        "image_side": {"multiple_of": info.size_multiple, "max": info.max_side},
                        "num_images": {"min": 1, "max": MAX_IMAGES_PER_REQUEST},
                        "frames": {"min": 2, "max": MAX_FRAMES},
                        "seed": {"min": 0, "max": MAX_SEED}, "output_format": sorted(FORMATS)},
        ))
    return models
