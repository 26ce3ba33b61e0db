"""HTTP bodies -> DiffusionRequest: the checks that depend on the chosen pipeline
(sizes, images, masks, family-only fields), each failing with an InvalidRequest that
names the field and its limit."""

from __future__ import annotations

import base64

import numpy as np

from services.control_requests import control_units
from services.errors import InvalidRequest
from services.imaging import ImageTooLarge, decode_image
from services.pipelines.diffusion import DiffusionRequest, DiffusionSpec, denoising_steps
from services.pipelines.diffusion_checks import check_cache_interval, check_denoising_steps
from services.schemas import resolve_seed


def decode_field(data: str, channels: int, field: str, max_side: int) -> np.ndarray:
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise InvalidRequest(f"{field} is not valid base64", field=field) from None
    try:
        return decode_image(raw, channels, field, max_side)
    except ImageTooLarge as exc:
        raise InvalidRequest(str(exc), field=field, limit=exc.limit) from None
    except ValueError as exc:
        raise InvalidRequest(str(exc), field=field, allowed=getattr(exc, "allowed", None)) from None


def image_steps(request: DiffusionRequest, rounding: str = "steps") -> int:
    """What a request costs the engine: denoising steps x images (the queue's unit);
    `rounding`: its model's (DiffusionSpec.strength_rounding)."""
    return denoising_steps(request, rounding) * request.num_images


def check_sides(spec: DiffusionSpec, height: int, width: int, field: str | None = None) -> None:
    """Each side a multiple of the model's size step, within its limits."""
    limits = spec.side_limits()
    for key, side in (("height", height), ("width", width)):
        lim = limits[key]
        if side % lim["multiple_of"] or not lim["min"] <= side <= lim["max"]:
            name = field or key
            raise InvalidRequest(f"{name} {key} must be a multiple of {lim['multiple_of']} from {lim['min']} "
                                 f"to {lim['max']} pixels, got {side}", field=name, limit=lim["max"])


EXTRA_FIELDS = ("original_size", "target_size", "crops_coords_top_left")


def family_extras(body, spec: DiffusionSpec, height: int, width: int) -> dict:
    """Fields only some families take (SDXL's size micro-conditioning), with the defaults
    diffusers uses: original and target size = the output size, crop at (0, 0). Refused,
    naming the field, for a model whose family does not take them."""
    extras = {}
    for key in EXTRA_FIELDS:
        value = getattr(body, key, None)
        if key not in spec.extra_fields:
            if value is not None:
                raise InvalidRequest(f"{key} is not used by model {spec.name!r} ({spec.family}); omit it",
                                     field=key)
            continue
        default = (0, 0) if key == "crops_coords_top_left" else (height, width)
        extras[key] = tuple(int(v) for v in value) if value is not None else default
    return extras


def build_request(task: str, body, pipeline, max_adapters: int | None = None) -> tuple[DiffusionRequest, dict]:
    """(the pipeline request, every parameter after defaults for the response); `max_adapters`:
    the most LoRA adapters per request (GENSERVE_MAX_ADAPTERS_PER_REQUEST)."""
    spec = pipeline.spec
    if not body.prompt.strip():
        raise InvalidRequest("prompt must not be blank", field="prompt")
    params = body.model_dump(exclude={"model", "image", "mask", "controlnet"}, exclude_none=False)
    # The model's own defaults: a flow-matching model has no "ddim", a distilled one's guidance is ~3.5.
    params["guidance_scale"] = spec.default_guidance_scale if body.guidance_scale is None else body.guidance_scale
    params["scheduler"] = body.scheduler or pipeline.default_scheduler
    if spec.guidance == "embedded" and body.negative_prompt:
        raise InvalidRequest(f"negative_prompt is not used by model {spec.name!r}: a guidance-distilled model takes "
                             "guidance_scale as an input, not classifier-free guidance; omit it",
                             field="negative_prompt")
    params["seed"] = resolve_seed(body.seed, body.num_images)
    check_cache_interval(spec, body.cache_interval)
    max_side = max(lim["max"] for lim in spec.side_limits().values())
    init_image = mask = None
    if task == "txt2img":
        params["height"] = body.height or spec.native_height
        params["width"] = body.width or spec.native_width
        check_sides(spec, params["height"], params["width"])
    else:
        if spec.vae_encoder is None:
            raise InvalidRequest(f"model {spec.name!r} has no VAE encoder: {task} is not available", field="model")
        # the engine's own check, before any image is decoded
        check_denoising_steps(body.num_inference_steps, body.strength, from_image=True,
                              rounding=spec.strength_rounding)
        init_image = decode_field(body.image, spec.image_channels, "image", max_side)
        height, width = init_image.shape[1:]
        params["height"], params["width"] = height, width
        check_sides(spec, height, width, field="image")
        if task == "inpaint":
            mask = decode_field(body.mask, 1, "mask", max_side)[0]
            if mask.shape != init_image.shape[1:]:
                raise InvalidRequest(
                    f"mask is {mask.shape[1]}x{mask.shape[0]} but image is "
                    f"{init_image.shape[2]}x{init_image.shape[1]}: they must match", field="mask")
            mask = (mask > 0).astype(np.float32)  # white (> mid-grey) = repaint
    extras = family_extras(body, spec, params["height"], params["width"])
    control, echoed = control_units(body, pipeline, params["height"], params["width"])
    if hasattr(body, "controlnet"):
        params["controlnet"] = echoed  # each unit without its image, hashed instead
    for key in EXTRA_FIELDS:
        params.pop(key, None)
    params.update({k: list(v) for k, v in extras.items()})
    request = DiffusionRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, num_images=body.num_images,
        num_inference_steps=body.num_inference_steps, guidance_scale=params["guidance_scale"],
        scheduler=params["scheduler"], height=params["height"], width=params["width"], seed=params["seed"],
        init_image=init_image, strength=getattr(body, "strength", 1.0), mask=mask, extras=extras,
        cache_interval=body.cache_interval, controlnet=control,
        guess_mode=bool(control) and (getattr(body, "guess_mode", False) or pipeline.control.global_pool(control)),
        lora=[(a.name, a.scale) for a in body.lora],
    )
    pipeline.check_adapters(request, max_adapters)
    if hasattr(body, "guess_mode"):
        params["guess_mode"] = request.guess_mode  # on when the first ControlNet pools its conditions
    return request, params
