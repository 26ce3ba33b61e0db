"""HTTP bodies -> DiffusionRequest: the checks that depend on the chosen pipeline
(sizes, images, masks), each failing with an InvalidRequest that names the field."""

from __future__ import annotations

import base64

import numpy as np

from services.errors import InvalidRequest
from services.imaging import ImageTooLarge, decode_image
from services.pipelines.pipeline_stable_diffusion import DiffusionRequest, StableDiffusionModels
from services.schemas import resolve_seed

# Largest output side, as a multiple of the model's native resolution.
MAX_SIDE_FACTOR = 2


def side_limits(m: StableDiffusionModels) -> dict:
    return {"multiple_of": m.size_multiple, "min": m.size_multiple,
            "max": MAX_SIDE_FACTOR * m.native_size, "default": m.native_size}


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
        raise InvalidRequest(str(exc), field=field) from None


def effective_steps(num_inference_steps: int, strength: float) -> int:
    """Denoising steps an image-to-image request runs (diffusers' get_timesteps)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def min_strength(num_inference_steps: int) -> float:
    """The smallest strength that still runs one step."""
    s = 1.0 / num_inference_steps
    while effective_steps(num_inference_steps, s) < 1:
        s = float(np.nextafter(s, 2.0))
    return s


def image_steps(request: DiffusionRequest) -> int:
    """What a request costs the engine: denoising steps x images (the queue's unit)."""
    steps = request.num_inference_steps
    if request.init_image is not None:
        steps = effective_steps(steps, request.strength)
    return steps * request.num_images


def build_request(task: str, body, m: StableDiffusionModels) -> tuple[DiffusionRequest, dict]:
    """(the pipeline request, every parameter after defaults for the response)."""
    if not body.prompt.strip():
        raise InvalidRequest("prompt must not be blank", field="prompt")
    params = body.model_dump(exclude={"model", "image", "mask"})
    params["seed"] = resolve_seed(body.seed, body.num_images)
    limits = side_limits(m)
    init_image = mask = None
    if task == "txt2img":
        params["height"] = body.height or m.native_size
        params["width"] = body.width or m.native_size
    else:
        if m.vae_encoder is None:
            raise InvalidRequest(f"model {m.name!r} has no VAE encoder: {task} is not available", field="model")
        if effective_steps(body.num_inference_steps, body.strength) < 1:
            least = min_strength(body.num_inference_steps)
            raise InvalidRequest(
                f"strength x num_inference_steps must give at least one denoising step: with "
                f"num_inference_steps={body.num_inference_steps}, strength must be at least {least:.6g}",
                field="strength", limit=least)
        init_image = decode_field(body.image, m.image_channels, "image", limits["max"])
        params["height"], params["width"] = init_image.shape[1:]
        if task == "inpaint":
            mask = decode_field(body.mask, 1, "mask", limits["max"])[0]
            if mask.shape != init_image.shape[1:]:
                raise InvalidRequest(
                    f"mask is {mask.shape[1]}x{mask.shape[0]} but image is "
                    f"{init_image.shape[2]}x{init_image.shape[1]}: they must match", field="mask")
            mask = (mask > 0).astype(np.float32)  # white (> mid-grey) = repaint
    for key in ("height", "width"):
        side, field = params[key], key if task == "txt2img" else "image"
        if side % m.size_multiple or not limits["min"] <= side <= limits["max"]:
            raise InvalidRequest(f"{field} {key} must be a multiple of {m.size_multiple} "
                                 f"from {limits['min']} to {limits['max']} pixels, got {side}",
                                 field=field, limit=limits["max"])
    request = DiffusionRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, num_images=body.num_images,
        num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
        scheduler=body.scheduler, height=params["height"], width=params["width"], seed=params["seed"],
        init_image=init_image, strength=getattr(body, "strength", 1.0), mask=mask,
    )
    return request, params
