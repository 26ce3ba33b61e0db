"""GAN sampling: `POST /v1/gan/generate`, for every GAN family (services.families): this
router samples the `gan` family's generators and hands the others' models to their own
router's `generate(ctx, name, body)`."""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence

from fastapi import APIRouter, Depends

from services import families
from services.context import ServiceContext, context
from services.errors import ModelNotFound
from services.gateway import request_id_var
from services.imaging import FORMATS
from services.openapi import error_responses
from services.routers import image_to_image
from services.schemas import (
    MAX_IMAGES_PER_REQUEST,
    MAX_SEED,
    GANGenerateRequest,
    GANGenerateResponse,
    ModelDescription,
    check_class_label,
    resolve_seed,
    tensors,
)

router = APIRouter()


@router.post("/gan/generate", response_model=GANGenerateResponse, responses=error_responses())
async def gan_generate(body: GANGenerateRequest, ctx: ServiceContext = Depends(context)) -> GANGenerateResponse:
    """Samples a GAN generator: seeded, optionally truncated and class-conditioned."""
    start = time.perf_counter()
    # 1. Check inputs against the chosen model.
    served = {name: family for family in families.FAMILIES if family.gan for name in ctx.served(family)}
    name = ctx.model_name(body.model, "gan", served)
    if name not in served:
        raise ModelNotFound(f"model {name!r} is not a GAN served here", field="model", allowed=sorted(served))
    if served[name].router != __name__:
        return await importlib.import_module(served[name].router).generate(ctx, name, body)
    pipeline = ctx.gan[name]
    check_class_label(name, body.class_label, pipeline.info.num_classes)
    seed = resolve_seed(body.seed, body.num_images)
    if body.upscale is not None:  # refused before generating, not after
        image_to_image.check_upscale(ctx, body.upscale, pipeline.info.image_size, pipeline.info.image_size,
                                     body.num_images)

    # 2. Generate (and upscale, when asked).
    out = await pipeline(seed, body.num_images, body.truncation_psi, body.class_label)

    # 3. Encode, with provenance in each image's metadata.
    labels: Sequence[int | None] = out.class_labels or [None] * len(out.seeds)
    metas = [{"model": name, "version": pipeline.spec.version, "seed": seed, "class_label": label,
              "truncation_psi": body.truncation_psi} for seed, label in zip(out.seeds, labels)]
    parameters = {**body.model_dump(exclude={"model", "upscale"}), "seed": seed}  # upscale: set by the stage
    timings = {"inference_seconds": round(out.inference_seconds, 6)}
    pixels, value_range, fmt = await image_to_image.chain(ctx, body.upscale, out.images, pipeline.info.output_range,
                                                          body.output_format, metas, parameters, timings)
    images = ctx.encode_images(pixels, value_range, fmt, metas)
    for image, label in zip(images, labels):
        image.class_label = label
    total = ctx.record("gan", name, len(images), start)
    return GANGenerateResponse(
        request_id=request_id_var.get(), model=name, model_version=pipeline.spec.version,
        backend=ctx.backend.name, parameters=parameters, images=images,
        timings={**timings, "total_seconds": round(total, 6)},
    )


def describe(ctx: ServiceContext) -> list[ModelDescription]:
    models = []
    for name, pipeline in ctx.gan.items():
        spec, info = pipeline.spec, pipeline.info
        params = {
            "num_images": {"min": 1, "max": MAX_IMAGES_PER_REQUEST},
            "seed": {"min": 0, "max": MAX_SEED},
            "truncation_psi": {"min": 0.0, "max": 1.0},
            "output_format": sorted(FORMATS),
        }
        if info.num_classes:
            params["class_label"] = {"min": 0, "max": info.num_classes - 1}
        models.append(ModelDescription(
            name=name, version=spec.version, pipeline="gan", endpoint="/v1/gan/generate",
            backend=ctx.backend.name, max_batch_size=spec.max_batch_size,
            inputs=tensors(spec.inputs), outputs=tensors(spec.outputs), parameters=params,
        ))
    return models
