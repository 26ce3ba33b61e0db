"""Request and response bodies. The types are the API: limits live in the fields, so
validation happens before any handler runs and the OpenAPI page shows them."""

from __future__ import annotations

import functools
import secrets
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.schedulers import SchedulerName

MAX_IMAGES_PER_REQUEST = 16
MAX_SEED = 2**32 - 1

OutputFormat = Literal["png", "jpeg", "webp"]
MIN_TIMEOUT_S = 1.0  # a deadline shorter than one step is a client bug, not a 504


def check_class_label(model: str, label: int | None, num_classes: int, field: str = "class_label") -> None:
    """A label given to a model: refused for an unconditional one, bounded by num_classes."""
    from services.errors import InvalidRequest

    if label is None:
        return
    if not num_classes:
        raise InvalidRequest(f"model {model!r} is unconditional: omit {field}", field=field)
    if label >= num_classes:
        raise InvalidRequest(f"{field} must be below {num_classes} for model {model!r}", field=field,
                             limit=num_classes - 1)


def resolve_seed(seed: int | None, num_images: int) -> int:
    """The request's seed: image i uses seed + i, so every listed seed must itself be a
    valid seed (at most MAX_SEED). A random seed is drawn so that it is."""
    from services.errors import InvalidRequest

    top = MAX_SEED - (num_images - 1)
    if seed is None:
        return secrets.randbelow(top + 1)
    if seed > top:
        raise InvalidRequest(f"seed must be at most {top} with num_images={num_images}: image i uses seed + i, "
                             f"and seeds stop at {MAX_SEED}", field="seed", limit=top)
    return seed


def _integer_kind(annotation) -> str | None:
    """'int' for an integer field (optional or annotated too), 'list' for a list of them."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is int:
        return "int"
    if origin is Annotated:
        return _integer_kind(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {_integer_kind(a) for a in args if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    if origin is list and args and _integer_kind(args[0]) == "int":
        return "list"
    return None


def _integral(value):
    return int(value) if type(value) is float and value.is_integer() else value


class _Strict(BaseModel):
    # Unknown fields are errors (a typo must not silently fall back to a default), and
    # "3" is not 3: wrong types are rejected, not coerced.
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _integral_floats_are_integers(cls, data):
        """3961875.0 is an integer to JSON Schema (and some clients send every number as a
        float): integer fields take integral floats; 3.5 is still refused."""
        if not isinstance(data, dict):
            return data
        fields = _integer_fields(cls)
        fixed = {name: _integral(value) if fields[name] == "int" else
                 [_integral(v) for v in value] if isinstance(value, list) else value
                 for name, value in data.items() if name in fields}
        return {**data, **fixed} if fixed else data


@functools.cache
def _integer_fields(model: type[BaseModel]) -> dict[str, str]:
    return {name: kind for name, f in model.model_fields.items() if (kind := _integer_kind(f.annotation))}


class UpscaleStage(_Strict):
    """Super-resolution chained after generation, inside the same request."""

    model: str = Field(max_length=256, description="A super-resolution model served on /v1/upscale.")
    output_format: OutputFormat | None = Field(None, description="Format of the upscaled images; default: the "
                                               "request's output_format.")


UPSCALE_FIELD = Field(None, description="Run a super-resolution model on the generated images in the same request "
                      "(one response; timings per stage; each image's metadata names both models).")


class GANGenerateRequest(_Strict):
    model: str | None = Field(None, description="Generator to sample; default: the service's default GAN model.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Seed of image 0; image i uses seed + i. Random when absent.")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    class_label: int | None = Field(
        None, ge=0, description="Class to generate (conditional models only; below the model's num_classes). "
        "Absent: drawn per image from that image's generator.")
    truncation_psi: float = Field(1.0, ge=0.0, le=1.0, description="z <- psi * z; 1 = no truncation.")
    output_format: OutputFormat = "png"
    upscale: UpscaleStage | None = UPSCALE_FIELD


class GeneratedImage(BaseModel):
    index: int
    seed: int | None = Field(default=None, description="Reproduces this image alone with num_images 1 (None: the "
                             "image came from given latents, not from a seed).")
    class_label: int | None = None
    media_type: str
    width: int
    height: int
    data: str = Field(description="Base64-encoded image bytes.")


class GANGenerateResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    request_id: str
    model: str
    model_version: str
    backend: str
    parameters: dict = Field(description="Every parameter after defaults, seed included.")
    images: list[GeneratedImage]
    timings: dict[str, float] = Field(description="Seconds: model execution and the whole pipeline.")


class TensorDescription(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelDescription(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    pipeline: str
    endpoint: str
    backend: str
    max_batch_size: int
    inputs: list[TensorDescription]
    outputs: list[TensorDescription]
    parameters: dict = Field(description="Request parameters this model accepts, with their limits.")
    cost_model: dict | None = Field(default=None, description=(
        "Step engines only: the denoiser's measured milliseconds per call by batch rows at the native "
        "size (start-up timing refreshed by live calls), the rows per iteration the engine runs "
        "(most rows per second within the latency budget) and the throughput there."))


class ModelList(BaseModel):
    default_models: dict[str, str | None] = Field(description=(
        "Per family, the model a request naming none gets; null when several are served and none was "
        "configured (requests must name `model`)."))
    models: list[ModelDescription]


MAX_DIFFUSION_IMAGES = 8  # classifier-free guidance doubles the U-Net batch
MAX_INFERENCE_STEPS = 150
MAX_GUIDANCE_SCALE = 30.0
MAX_PROMPT_CHARS = 2000
MAX_IMAGE_BASE64_CHARS = 16 * 1024 * 1024

MAX_CONDITIONING_SIDE = 16384
Side = Annotated[int, Field(ge=0, le=MAX_CONDITIONING_SIDE)]
SizePair = Annotated[list[Side], Field(min_length=2, max_length=2)]


class _SizeConditioning(BaseModel):
    """SDXL's micro-conditioning (diffusers' defaults when absent); other families refuse it."""

    original_size: SizePair | None = Field(None, description="SDXL only: [height, width] the model is told "
                                           "the source had; default: the output size.")
    target_size: SizePair | None = Field(None, description="SDXL only: [height, width]; default: the output size.")
    crops_coords_top_left: SizePair | None = Field(None, description="SDXL only: [top, left]; default [0, 0].")


MAX_CONTROLNET_UNITS = 4
MAX_CONDITIONING_SCALE = 5.0
MAX_CANNY_THRESHOLD = 2048  # above any 8-bit image's Sobel gradient magnitude (4 * 255 * sqrt(2))


class ControlNetUnit(_Strict):
    """One ControlNet acting on a request (diffusers' StableDiffusionControlNetPipeline arguments)."""

    model: str = Field(max_length=256, description="A ControlNet exported for the request's model (GET /v1/models).")
    image: str = Field(max_length=MAX_IMAGE_BASE64_CHARS, description="Control image, base64 PNG/JPEG/WebP (multipart: "
                       "a file part named controlnet_image_<i> instead); resized to the output size as diffusers "
                       "does, so its aspect ratio must be the output's.")
    conditioning_scale: float = Field(1.0, ge=0.0, le=MAX_CONDITIONING_SCALE, description="Weight of its residuals.")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the steps before it starts acting.")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the steps after which it stops.")
    preprocess: Literal["canny"] | None = Field(None, description="canny: OpenCV's Canny edges of the image first "
                                                "(send a photo to a canny ControlNet).")
    canny_thresholds: Annotated[list[Annotated[int, Field(ge=0, le=MAX_CANNY_THRESHOLD)]],
                                Field(min_length=2, max_length=2)] = Field(
        [100, 200], description="Canny's low and high hysteresis thresholds (gradient magnitudes).")

    @model_validator(mode="after")
    def _window(self):
        if self.guidance_start >= self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start}) must be below guidance_end "
                             f"({self.guidance_end})")
        return self


class _Control(BaseModel):
    controlnet: list[ControlNetUnit] = Field(
        default_factory=list, max_length=MAX_CONTROLNET_UNITS,
        description="ControlNets steering the image (several: their residuals are summed).")
    guess_mode: bool = Field(False, description="ControlNet guess mode, as diffusers: control on the conditional "
                             "half only, its residuals ramped from 0.1 to 1 over the down blocks.")

    @model_validator(mode="before")
    @classmethod
    def _from_form(cls, data):
        """A multipart form sends `controlnet` as JSON text and each unit's image as a file part
        `controlnet_image_<i>` (base64 by then)."""
        if not isinstance(data, dict) or not isinstance(data.get("controlnet"), str):
            return data
        import json

        data = dict(data)
        try:
            units = json.loads(data["controlnet"])
        except ValueError:
            raise ValueError("controlnet: a form field of JSON text (a list of units)") from None
        if isinstance(units, list):
            for i, unit in enumerate(units):
                file = data.pop(f"controlnet_image_{i}", None)
                if isinstance(unit, dict) and file is not None:
                    unit.setdefault("image", file)
        data["controlnet"] = units
        return data


MIN_LORA_SCALE, MAX_LORA_SCALE = -2.0, 2.0
MAX_ADAPTER_NAME_CHARS = 256


class LoraAdapter(_Strict):
    """One LoRA adapter acting on a request (diffusers' `set_adapters(names, adapter_weights)`)."""

    name: str = Field(min_length=1, max_length=MAX_ADAPTER_NAME_CHARS,
                      description="An adapter stored for the model (GET /v1/models lists them).")
    scale: float = Field(1.0, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE, description="Its weight on the U-Net and text "
                         "encoder alike (0: no effect; negative: away from it).")


class AdapterFields(BaseModel):
    lora: list[LoraAdapter] = Field(
        default_factory=list, description="LoRA adapters, each with its own scale (several: their low-rank "
        "updates add up); at most GENSERVE_MAX_ADAPTERS_PER_REQUEST (GET /v1/models).")

    @model_validator(mode="before")
    @classmethod
    def _lora_from_form(cls, data):
        """A multipart form sends `lora` as JSON text."""
        if not isinstance(data, dict) or not isinstance(data.get("lora"), str):
            return data
        import json

        try:
            return {**data, "lora": json.loads(data["lora"])}
        except ValueError:
            raise ValueError("lora: a form field of JSON text (a list of {name, scale})") from None


class Txt2ImgRequest(_Strict, _SizeConditioning, _Control, AdapterFields):
    model: str | None = Field(None, description="Diffusion pipeline; default: the service's default.")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw (not blank).")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                                 description="What to steer away from (with guidance > 1).")
    num_images: int = Field(1, ge=1, le=MAX_DIFFUSION_IMAGES)
    num_inference_steps: int = Field(20, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE_SCALE,
        description="Classifier-free guidance (<= 1 disables it), or the guidance input of guidance-distilled "
                    "models (FLUX.1-dev). Default: the model's (GET /v1/models; 7.5 for SD-style models).")
    scheduler: SchedulerName | None = Field(
        None, description="Sampler; default: the model's (ddim where it can be built; flow_match_euler for "
                          "flow-matching models). GET /v1/models lists each model's.")
    height: int | None = Field(None, ge=8, description="Pixels, a multiple of 8; default: the model's native size.")
    width: int | None = Field(None, ge=8, description="Pixels, a multiple of 8; default: the model's native size.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of image 0; image i uses seed + i.")
    cache_interval: int = Field(1, ge=1, description="DeepCache: a full U-Net step every N steps, the steps between "
                                "reuse its deep features through the shallow U-Net (faster, an approximation; 1 = off, "
                                "the exact image). Maximum and availability per model: GET /v1/models.")
    output_format: OutputFormat = "png"
    timeout_s: float | None = Field(None, ge=MIN_TIMEOUT_S,
                                    description="Deadline in seconds; default and maximum: see /v1/models.")
    upscale: UpscaleStage | None = UPSCALE_FIELD


class Txt2ImgStreamRequest(Txt2ImgRequest):
    preview_every: int = Field(0, ge=0, le=MAX_INFERENCE_STEPS,
                               description="Send a preview of the current estimate every k steps (0: none).")


class Img2ImgRequest(_Strict, _SizeConditioning, _Control, AdapterFields):
    model: str | None = None
    image: str = Field(max_length=MAX_IMAGE_BASE64_CHARS,
                       description="Base64 PNG/JPEG/WebP; its size is the output size.")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    strength: float = Field(0.8, gt=0.0, le=1.0, description="How far from the input: 1 = ignore it.")
    num_images: int = Field(1, ge=1, le=MAX_DIFFUSION_IMAGES)
    num_inference_steps: int = Field(20, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE_SCALE, description="Default: the model's.")
    scheduler: SchedulerName | None = Field(None, description="Default: the model's.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    cache_interval: int = Field(1, ge=1, description="DeepCache: a full U-Net step every N steps, the steps between "
                                "reuse its deep features through the shallow U-Net (faster, an approximation; 1 = off, "
                                "the exact image). Maximum and availability per model: GET /v1/models.")
    output_format: OutputFormat = "png"
    timeout_s: float | None = Field(None, ge=MIN_TIMEOUT_S)


class InpaintRequest(Img2ImgRequest):
    mask: str = Field(max_length=MAX_IMAGE_BASE64_CHARS,
                      description="Base64 image of the image's size: white = repaint.")
    strength: float = Field(1.0, gt=0.0, le=1.0)


class DDPMGenerateRequest(_Strict):
    model: str | None = Field(None, description="Pixel-space DDPM/DDIM model; default: the service's default.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of image 0; image i uses seed + i.")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    class_label: int | None = Field(
        None, ge=0, description="Class to generate (class-conditional models only; below the model's num_classes). "
        "Absent: drawn per image, default_rng(seed + i).integers(num_classes).")
    num_inference_steps: int = Field(20, ge=1, le=MAX_INFERENCE_STEPS)
    scheduler: SchedulerName = "ddim"
    output_format: OutputFormat = "png"
    timeout_s: float | None = Field(None, ge=MIN_TIMEOUT_S, description="Deadline in seconds.")
    upscale: UpscaleStage | None = UPSCALE_FIELD


class DDPMGenerateStreamRequest(DDPMGenerateRequest):
    preview_every: int = Field(0, ge=0, le=MAX_INFERENCE_STEPS,
                               description="Send a preview of the current estimate every k steps (0: none).")


class DiffusionResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    request_id: str
    model: str
    backend: str
    parameters: dict = Field(description="Every parameter after defaults, seed included (input images omitted).")
    images: list[GeneratedImage]
    timings: dict[str, float] = Field(description="Seconds per stage: text encoding, denoising, decoding, total.")


class ErrorDetail(BaseModel):
    field: str
    message: str
    type: str | None = None
    limit: Any = None


class Error(BaseModel):
    code: str = Field(description="Machine-readable: invalid_request, unauthorized, rate_limited, queue_full, ...")
    message: str = Field(description="What went wrong and what to change.")
    field: str | None = Field(None, description="The request field (or header) at fault.")
    limit: Any = Field(None, description="The limit the value broke.")
    allowed: list[Any] | None = Field(None, description="The values that would be accepted.")
    details: list[ErrorDetail] | None = Field(None, description="Every problem found (invalid_request).")
    request_id: str


class ErrorResponse(BaseModel):
    """The one error shape of every endpoint."""

    error: Error


def tensors(items) -> list[TensorDescription]:
    """A model config's tensors (services.runtime TensorInfo) as the API describes them."""
    return [TensorDescription(name=t.name, datatype=str(t.dtype), shape=list(t.dims)) for t in items]


MAX_LATENT_BASE64_CHARS = 16 * 1024 * 1024
MAX_FRAMES = 32


class LatentTensor(BaseModel):
    """A tensor as KServe v2 names its fields, the payload base64 (little-endian float32)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=4, max_length=4,
                                                               description="[N, C, h, w]")
    datatype: Literal["FP32"] = "FP32"
    data: str = Field(max_length=MAX_LATENT_BASE64_CHARS, description="Base64 of N*C*h*w little-endian float32.")


class VAEEncodeRequest(_Strict):
    model: str | None = Field(None,
                              description="A VAE or a latent diffusion pipeline; default: the service's default VAE.")
    image: str = Field(max_length=MAX_IMAGE_BASE64_CHARS, description="Base64 PNG/JPEG/WebP.")
    sample: bool = Field(False, description="false: the posterior mean; true: a sample drawn with `seed`.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the posterior sample (sample: true).")


class VAEEncodeResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    request_id: str
    model: str
    backend: str
    parameters: dict
    latent: LatentTensor = Field(description="In the VAE's own latent space (not scaled by scaling_factor).")
    timings: dict[str, float]


class VAEDecodeRequest(_Strict):
    model: str | None = None
    latent: LatentTensor
    output_format: OutputFormat = "png"


class VAESampleRequest(_Strict):
    model: str | None = Field(None, description="A standalone VAE; default: the service's default VAE.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of image 0; image i uses seed + i.")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    output_format: OutputFormat = "png"


class VAEInterpolateRequest(_Strict):
    model: str | None = None
    image_a: str | None = Field(None, max_length=MAX_IMAGE_BASE64_CHARS,
                                description="Start: an image (its posterior mean).")
    image_b: str | None = Field(None, max_length=MAX_IMAGE_BASE64_CHARS, description="End: an image.")
    seed_a: int | None = Field(None, ge=0, le=MAX_SEED,
                               description="Start: N(0, I) latents of this seed (standalone VAEs).")
    seed_b: int | None = Field(None, ge=0, le=MAX_SEED, description="End: N(0, I) latents of this seed.")
    frames: int = Field(8, ge=2, le=MAX_FRAMES, description="Images along the line, both ends included.")
    output_format: OutputFormat = "png"


# -- StyleGAN W space ---------------------------------------------------------------------
MAX_INTERPOLATION_SEEDS = 8


class WTensor(BaseModel):
    """w [N, w_dim] or per-layer ws [N, num_ws, w_dim], KServe v2 field names, base64 FP32."""

    model_config = ConfigDict(extra="forbid", strict=True)
    shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=2, max_length=3)
    datatype: Literal["FP32"] = "FP32"
    data: str = Field(max_length=MAX_LATENT_BASE64_CHARS)


class GANMixRequest(_Strict):
    model: str | None = Field(None, description="A StyleGAN model; default: the service's default GAN model.")
    seed: int = Field(ge=0, le=MAX_SEED, description="Source of the coarse styles (layers before crossover).")
    style_seed: int = Field(ge=0, le=MAX_SEED, description="Source of the fine styles (layers from crossover on).")
    class_label: int | None = Field(None, ge=0, description="Class of `seed` (drawn from it when absent).")
    style_class_label: int | None = Field(None, ge=0, description="Class of `style_seed` (drawn when absent).")
    crossover: int | None = Field(None, ge=0, description="First ws layer taken from style_seed; default num_ws // 2. "
                                  "num_ws gives the seed image, 0 the style_seed image.")
    truncation_psi: float = Field(1.0, ge=0.0, le=1.0)
    include_sources: bool = Field(False, description="Also return both source images.")
    output_format: OutputFormat = "png"


class GANInterpolateRequest(_Strict):
    model: str | None = None
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(min_length=2, max_length=MAX_INTERPOLATION_SEEDS)
    class_labels: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_INTERPOLATION_SEEDS,
                                                                   description="One per seed (conditional "
                                                                   "models); drawn per seed when absent.")
    frames: int = Field(8, ge=2, le=MAX_FRAMES, description="Frames per segment, both ends included.")
    space: Literal["z", "w"] = Field("w", description="z: slerp between the seeds' z; w: lerp between their w.")
    truncation_psi: float = Field(1.0, ge=0.0, le=1.0)
    output_format: Literal["png", "jpeg", "webp", "gif", "webp_animated"] = Field(
        "png", description="Frames as images, or one animated GIF/WebP holding them all.")


class GANLatentsRequest(_Strict):
    model: str | None = None
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(min_length=1, max_length=MAX_IMAGES_PER_REQUEST)
    class_labels: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_IMAGES_PER_REQUEST,
                                                                   description="One per seed.")
    truncation_psi: float = Field(1.0, ge=0.0, le=1.0)


class GANLatentsResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    request_id: str
    model: str
    backend: str
    parameters: dict
    w: WTensor = Field(description="[N, w_dim], truncated as asked; send it (or edited) to /v1/gan/synthesize.")


class GANSynthesizeRequest(_Strict):
    model: str | None = None
    w: WTensor = Field(description="[N, w_dim] (the same w for every layer) or [N, num_ws, w_dim].")
    output_format: OutputFormat = "png"


class GANEditRequest(_Strict):
    model: str | None = None
    seed: int = Field(ge=0, le=MAX_SEED)
    class_label: int | None = Field(None, ge=0)
    direction: str = Field(max_length=128, description="A direction named in GET /v1/models.")
    strength: float = Field(1.0, ge=-10.0, le=10.0, description="w + strength * direction.")
    truncation_psi: float = Field(1.0, ge=0.0, le=1.0)
    output_format: OutputFormat = "png"


# -- image -> image: /v1/upscale, /v1/translate ---------------------------------------------
MIN_TILE, MAX_TILE = 16, 1024
MAX_TILE_OVERLAP = 256


class UpscaleRequest(_Strict):
    model: str | None = Field(None, description="Super-resolution model; default: the only one served.")
    image: str = Field(max_length=MAX_IMAGE_BASE64_CHARS,
                       description="Base64 PNG/JPEG/WebP, any size up to the output limit (see /v1/models). "
                       "Alpha is upscaled apart from the colour (bicubic); grey images come back grey.")
    output_format: OutputFormat = "png"
    tile: int | None = Field(None, ge=MIN_TILE, le=MAX_TILE,
                             description="Tile side in input pixels (a multiple of the model's size multiple); "
                             "default: the model's. Larger images are processed in overlapping tiles.")
    tile_overlap: int | None = Field(None, ge=0, le=MAX_TILE_OVERLAP,
                                     description="Overlap between tiles, input pixels, less than half the tile; "
                                     "default: the model's.")


class TranslateRequest(UpscaleRequest):
    model: str | None = Field(None, description="Image-to-image translator; default: the only one served.")
