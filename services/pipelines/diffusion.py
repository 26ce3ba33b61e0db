"""Diffusion, whatever the family: the generic pipeline the step engine drives.

A family (SD 1/2, SDXL, FLUX, pixel-space DDPM, ...) is a `DiffusionSpec` read from the
repository plus a `Conditioner`: what the denoiser is conditioned on (text encoders and
their outputs, pooled embeddings, micro-conditioning, class labels, guidance inputs), and,
when its denoiser is not U-Net-shaped, a denoiser interface (`UNetDenoiser` is the default;
FLUX packs latents into patches and sets its own shifted schedule). Everything else —
timesteps, latents, classifier-free guidance, the scheduler step, img2img and
inpainting, VAE encode/decode or none in pixel space — is here once.

    tokenize -> encode (batched, cached by the engine) -> start: rows + latents -> Trajectory
    per step: Trajectory.model_inputs() -> denoise (one call shared by many requests) -> advance()
    decode

DeepCache (`cache_interval` > 1, U-Net families exported with a shallow graph): the
trajectory keeps the deep features its full steps return, and its other steps' inputs carry
them, which sends those rows to the shallow graph (export/deepcache.py).

Determinism rule (README, "Reproducing an image"): image i of a request with seed s
draws everything random from its own `rng = numpy.random.default_rng(s + i)`, in order:
  text/class to image  x_T = rng.standard_normal((C, h, w), dtype=float32) * init_noise_sigma
  image to image       VAE posterior sample eps_q, then the forward-noise eps_n (both that shape):
                       latents = add_noise(scaling_factor * (mean + std * eps_q), eps_n, t_start)
  then                 per step, the ancestral noise of stochastic schedulers (DDPM, Euler a).
So an image never depends on its batch-mates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.adapters import PipelineAdapters
from services.errors import InvalidRequest
from services.pipelines.controlnet import ControlNets, ControlUnit, control_rows
from services.runtime import InferenceBackend, ModelSpec
from services.schedulers import make_scheduler, supported_schedulers

DEEP_FEATURES = "deep_features"  # the full U-Net's cached output and the shallow one's input
MAX_CACHE_INTERVAL = 10  # DeepCache's paper goes to N = 10 (quality falls past a few; bench/README.md)


class PromptTooLong(ValueError):
    def __init__(self, field_name: str, tokens: int, limit: int):
        super().__init__(f"{field_name} is {tokens} tokens long; the text encoder takes at most {limit}")
        self.field_name, self.tokens, self.limit = field_name, tokens, limit


@dataclass(frozen=True)
class DiffusionSpec:
    """What the generic pipeline needs to know of one served pipeline, whatever its family."""

    name: str
    family: str  # stable_diffusion, stable_diffusion_xl, ddpm, ...
    denoiser: str  # the U-Net (or transformer) graph
    scheduler_config: dict
    latent_channels: int  # the channels denoised (image channels in pixel space)
    image_channels: int
    vae_scale_factor: int  # pixels per latent side; 1 in pixel space
    native_height: int  # pixels
    native_width: int
    size_multiple: int  # output sides must be multiples of this (VAE and denoiser downsampling)
    vae_decoder: str | None = None  # None: pixel space
    vae_encoder: str | None = None  # None: no image-to-image
    scaling_factor: float = 1.0
    shift_factor: float = 0.0  # VAE latents = (z - shift) * scaling (FLUX-style VAEs)
    # Per-channel statistics (SDXL-style VAEs that ship them): latents = (z - mean) * scaling / std.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    max_side_factor: int = 2  # largest side, as a multiple of the native one
    output_name: str = "noise_pred"
    conditioning: str = "text"  # text (prompts), class (labels), none
    extra_fields: tuple[str, ...] = ()  # request fields only this family takes (SDXL's sizes)
    components: tuple[str, ...] = ()  # every graph of the pipeline, for GET /v1/models
    # What guidance_scale means: "classifier_free" (a negative half per image, combined after
    # the denoiser; > 1 turns it on) or "embedded" (guidance-distilled models: a denoiser input).
    guidance: str = "classifier_free"
    default_guidance_scale: float = 7.5
    # How `strength` becomes steps (see effective_steps): "steps" as SD's pipelines, "start" as FLUX's.
    strength_rounding: str = "steps"
    # DeepCache (export/deepcache.py): the graph that runs the denoiser's shallowest level over
    # the deep features its full graph returned as DEEP_FEATURES; None: requests cannot cache.
    shallow_denoiser: str | None = None

    def classifier_free(self, req: DiffusionRequest) -> bool:
        """Whether the request runs a negative half per image (as diffusers: scale 1 is the
        conditional model alone)."""
        return self.guidance == "classifier_free" and req.guidance_scale > 1.0

    def default_scheduler(self, supported: list[str]) -> str:
        return "ddim" if "ddim" in supported else supported[0]

    def to_vae(self, z: np.ndarray) -> np.ndarray:
        """Denoiser latents -> the VAE's own latent space (what its decoder takes)."""
        if self.latents_mean is not None:
            mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (self.latents_mean, self.latents_std))
            return (z * std / np.float32(self.scaling_factor) + mean).astype(np.float32)
        return (z / np.float32(self.scaling_factor) + np.float32(self.shift_factor)).astype(np.float32)

    def from_vae(self, z: np.ndarray) -> np.ndarray:
        """The VAE's latent space -> the denoiser's (the inverse of to_vae)."""
        if self.latents_mean is not None:
            mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (self.latents_mean, self.latents_std))
            return ((z - mean) * np.float32(self.scaling_factor) / std).astype(np.float32)
        return ((z - np.float32(self.shift_factor)) * np.float32(self.scaling_factor)).astype(np.float32)

    def side_limits(self) -> dict[str, dict]:
        """Per axis: multiple_of, min, max, default (pixels)."""
        return {axis: {"multiple_of": self.size_multiple, "min": self.size_multiple,
                       "max": self.max_side_factor * native, "default": native}
                for axis, native in (("height", self.native_height), ("width", self.native_width))}


def shallow_denoiser(unet: ModelSpec, shallow: ModelSpec | None) -> str | None:
    """The DeepCache shallow graph's name when the repository has it and the full U-Net
    returns the deep features it takes (a repository exported before DeepCache has neither)."""
    if shallow is None or DEEP_FEATURES not in {t.name for t in unet.outputs}:
        return None
    return shallow.name


class PromptTokenizer:
    """CLIP tokenization with the `tokenizers` library (no torch, no transformers): ids are
    bos, tokens, eos, then padding to max_length, exactly what diffusers feeds its text
    encoder. A prompt that does not fit is refused, never silently truncated."""

    def __init__(self, path: Path, max_length: int, pad_token_id: int, truncate: bool = False):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        # truncate: for an encoder that, as in its reference pipeline, sees only the start of a
        # prompt another encoder carries whole (FLUX's CLIP beside T5); special tokens are kept.
        if truncate:
            self.tokenizer.enable_truncation(max_length)
        else:
            self.tokenizer.no_truncation()
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __call__(self, text: str, field_name: str = "prompt") -> np.ndarray:
        ids = self.tokenizer.encode(text).ids
        if len(ids) > self.max_length:
            raise PromptTooLong(field_name, len(ids), self.max_length)
        return np.asarray(ids + [self.pad_token_id] * (self.max_length - len(ids)), dtype=np.int64)


@dataclass
class DiffusionRequest:
    prompt: str = ""
    negative_prompt: str = ""
    num_images: int = 1
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    height: int | None = None
    width: int | None = None
    seed: int = 0
    # image-to-image / inpainting: [C, H, W] in [-1, 1]; mask [H, W] in [0, 1], 1 = repaint.
    init_image: np.ndarray | None = None
    strength: float = 0.8
    mask: np.ndarray | None = None
    class_labels: list[int] | None = None  # per image, class-conditional denoisers
    cache_interval: int = 1  # DeepCache: a full denoiser step every N steps, shallow ones between (1: off)
    controlnet: list[ControlUnit] = field(default_factory=list)  # ControlNet units (services.pipelines.controlnet)
    guess_mode: bool = False  # ControlNet guess mode, as diffusers
    lora: list[tuple[str, float]] = field(default_factory=list)  # (adapter, scale): services.adapters
    adapter_loads: tuple[int, ...] = ()  # the loads of `lora`'s adapters it holds from admission (resolve_adapters)
    extras: dict[str, Any] = field(default_factory=dict)  # family conditioning (e.g. SDXL sizes)


@dataclass
class DiffusionOutput:
    images: np.ndarray  # [N, C, H, W] in [-1, 1]
    seeds: list[int]  # [N]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


class Conditioner(Protocol):
    """A family's conditioning. Keys identify a text's encoding (the engine caches by them)."""

    @property
    def empty_key(self) -> np.ndarray | None:
        """The key of "" (pinned in the cache); None without text."""

    def tokenize(self, req: DiffusionRequest) -> list[np.ndarray]:
        """One key per text to encode: [negative, positive] with guidance, [positive]
        without, [] for families without text. Raises PromptTooLong."""

    async def encode(self, keys: list[np.ndarray]) -> list[Any]:
        """Each key's encoding, batched in as few model calls as the family allows."""

    def rows(self, req: DiffusionRequest, encoded: list[Any], guided: bool) -> dict[str, np.ndarray]:
        """The denoiser's conditioning inputs, one row per image (negative half first when
        guided), as they are sent alongside `sample` and `timestep`."""


class Denoiser(Protocol):
    """How the generic loop talks to its denoiser graph. A family whose denoiser is not
    U-Net-shaped (FLUX: 2x2-packed latents, sigma timesteps, a resolution-dependent schedule)
    brings its own in its module."""

    def set_timesteps(self, scheduler, num_inference_steps: int, latent_shape: tuple[int, ...]) -> None:
        """The schedule of `num_inference_steps` for latents of `latent_shape` (C, h, w)."""

    def inputs(self, sample: np.ndarray, timestep) -> dict[str, np.ndarray]:
        """The graph's latent and timestep inputs for rows `sample` [R, C, h, w] at `timestep`."""

    def prediction(self, output: np.ndarray, latent_shape: tuple[int, ...]) -> np.ndarray:
        """The graph's output for those rows back in the latents' layout [R, C, h, w]."""


class UNetDenoiser:
    """The U-Net's interface: `sample` [R, C, h, w] and a per-row `timestep` in, the
    prediction in the latents' layout out, and the scheduler's own timestep spacing."""

    def set_timesteps(self, scheduler, num_inference_steps: int, latent_shape: tuple[int, ...]) -> None:
        scheduler.set_timesteps(num_inference_steps)

    def inputs(self, sample: np.ndarray, timestep) -> dict[str, np.ndarray]:
        return {"sample": sample, "timestep": np.full((len(sample), 1), timestep, dtype=np.float32)}

    def prediction(self, output: np.ndarray, latent_shape: tuple[int, ...]) -> np.ndarray:
        return output


UNET = UNetDenoiser()


def initial_latents(seed: int, num_images: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    """The documented per-image starting noise, before scaling by init_noise_sigma."""
    return [np.random.default_rng(seed + i).standard_normal(shape, dtype=np.float32) for i in range(num_images)]


def effective_steps(num_inference_steps: int, strength: float, rounding: str = "steps") -> int:
    """Denoising steps an image-to-image request of `strength` runs, as the family's diffusers
    pipeline counts them (its get_timesteps): "steps", SD's, runs int(n * strength) steps;
    "start", FLUX's, starts at int(n - n * strength), so a fractional n * strength rounds up."""
    n = num_inference_steps
    if rounding == "start":
        return n - int(max(n - n * strength, 0))
    return min(int(n * strength), n)


def denoising_steps(req: DiffusionRequest, rounding: str = "steps") -> int:
    """Steps the request's trajectory will run: image-to-image and inpainting start part-way."""
    if req.init_image is None:
        return req.num_inference_steps
    return effective_steps(req.num_inference_steps, req.strength, rounding)


def gaussian_posterior(latent_parameters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A VAE encoder's [2C, h, w] output -> (mean, std), as diffusers' DiagonalGaussianDistribution."""
    mean, logvar = np.split(latent_parameters, 2, axis=0)
    return mean, np.exp(0.5 * np.clip(logvar, -30.0, 20.0))


def img2img_timesteps(scheduler, num_inference_steps: int, strength: float, rounding: str = "steps") -> np.ndarray:
    """The tail of the schedule an image of `strength` starts from (diffusers' get_timesteps)."""
    init_timestep = effective_steps(num_inference_steps, strength, rounding)
    t_start = max(num_inference_steps - init_timestep, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return scheduler.timesteps[t_start:]


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """[H, W] -> [1, H/f, W/f] by taking every f-th pixel (nearest), as diffusers does for the
    latent mask with `interpolate(..., size=latent_size)` in its default nearest mode."""
    return mask[::factor, ::factor][None].astype(np.float32)


def merge_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One denoiser call's inputs from several trajectories' rows, in order. A key some parts
    lack (control inputs of requests without control) is zero for their rows."""
    keys: dict[str, np.ndarray] = {}
    for part in parts:
        for k, v in part.items():
            keys.setdefault(k, v)
    merged = {}
    for k, example in keys.items():
        pieces = []
        for part in parts:
            if k in part:
                pieces.append(part[k])
            else:
                rows = len(next(iter(part.values())))
                pieces.append(np.zeros((rows, *example.shape[1:]), example.dtype))
        merged[k] = np.concatenate(pieces)
    return merged


class Trajectory:
    """One request's denoising state: the body of diffusers' loop, split at the denoiser call.

    `model_inputs()` gives this step's rows ([negative, positive] halves with guidance),
    `advance(noise_pred)` applies guidance, the scheduler step and, for inpainting, latent
    blending. A single request runs one trajectory; the engine runs many side by side,
    sharing each denoiser call (per-sample timesteps make that exact).
    """

    def __init__(self, spec: DiffusionSpec, req: DiffusionRequest, cond: dict[str, np.ndarray],
                 rngs: list[np.random.Generator], image_latents: np.ndarray | None = None,
                 denoiser: Denoiser = UNET):
        self.req = req
        self.rngs = rngs
        self.do_cfg = spec.classifier_free(req)
        self.cond = cond  # conditioning rows, negative half first with guidance
        self.spec = spec
        self.denoiser = denoiser
        height, width = req.height or spec.native_height, req.width or spec.native_width
        latent_shape = (spec.latent_channels, height // spec.vae_scale_factor, width // spec.vae_scale_factor)
        self.latent_shape = latent_shape

        # Timesteps (img2img and inpainting start part-way, at `strength`).
        self.scheduler = make_scheduler(req.scheduler, spec.scheduler_config)
        denoiser.set_timesteps(self.scheduler, req.num_inference_steps, latent_shape)
        if self.scheduler.timesteps is None:
            raise RuntimeError(f"{type(self.scheduler).__name__}.set_timesteps set no schedule")
        self.timesteps: np.ndarray = self.scheduler.timesteps
        if req.init_image is not None:
            self.timesteps = img2img_timesteps(self.scheduler, req.num_inference_steps, req.strength,
                                               spec.strength_rounding)

        # Latents, drawn in the documented order from each image's own generator.
        self.image_latents = image_latents
        self.noise = self.mask = None
        if image_latents is None:
            latents = np.stack([rng.standard_normal(latent_shape, dtype=np.float32) for rng in rngs])
            self.latents = latents * np.float32(self.scheduler.init_noise_sigma)
        else:
            self.noise = np.stack([rng.standard_normal(latent_shape, dtype=np.float32) for rng in rngs])
            if req.mask is not None and req.strength >= 1.0:
                self.latents = self.noise * np.float32(self.scheduler.init_noise_sigma)  # pure noise, as diffusers
            else:
                self.latents = self.scheduler.add_noise(image_latents, self.noise, self.timesteps[:1])
            if req.mask is not None:
                self.mask = downsample_mask(req.mask, spec.vae_scale_factor)
        self.steps_done = 0
        self.pred_original_sample: np.ndarray | None = None  # latest x0 estimate, for previews
        # DeepCache: the deep features of the last full step, one per row, while they are reused.
        self.cache_interval = max(1, req.cache_interval)
        self.deep_features: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.steps_done >= self.num_steps

    @property
    def rows(self) -> int:
        """Denoiser batch rows this trajectory needs per step."""
        return len(self.latents) * (2 if self.do_cfg else 1)

    @property
    def caching(self) -> bool:
        """Whether full steps keep their deep features (the request asked for DeepCache)."""
        return self.cache_interval > 1

    @property
    def shallow(self) -> bool:
        """This step runs the shallow denoiser over the last full step's deep features:
        every step but each cache_interval-th (step 0, N, 2N, ... are full)."""
        return self.deep_features is not None and self.steps_done % self.cache_interval != 0

    def model_inputs(self) -> dict[str, np.ndarray]:
        t = self.timesteps[self.steps_done]
        sample = np.concatenate([self.latents, self.latents]) if self.do_cfg else self.latents
        sample = self.scheduler.scale_model_input(sample, t).astype(np.float32)
        inputs = {**self.denoiser.inputs(sample, t), **self.cond}
        if self.req.controlnet:
            inputs.update(control_rows(self.req.controlnet, self.req.guess_mode, self.steps_done, self.num_steps,
                                       len(self.latents), self.do_cfg))
        if self.shallow and self.deep_features is not None:  # (shallow implies features; said for the type)
            inputs[DEEP_FEATURES] = self.deep_features
        return inputs

    def advance(self, noise_pred: np.ndarray, deep_features: np.ndarray | None = None) -> None:
        """One step from the denoiser's output for this trajectory's rows; `deep_features`:
        what a full step returned for them, kept for the shallow steps that follow."""
        i, t = self.steps_done, self.timesteps[self.steps_done]
        if self.caching and deep_features is not None:
            self.deep_features = deep_features
        noise_pred = self.denoiser.prediction(noise_pred, self.latent_shape)
        if self.do_cfg:
            n = len(self.latents)
            uncond, cond = noise_pred[:n], noise_pred[n:]
            noise_pred = uncond + np.float32(self.req.guidance_scale) * (cond - uncond)
        out = self.scheduler.step(noise_pred, t, self.latents, generator=self.rngs)
        self.latents, self.pred_original_sample = out.prev_sample, out.pred_original_sample
        if self.mask is not None and self.image_latents is not None and self.noise is not None:
            # Latent blending (inpainting, which always starts from an image): outside the mask,
            # the original image noised to the next level.
            known = self.image_latents
            if i < self.num_steps - 1:
                known = self.scheduler.add_noise(self.image_latents, self.noise, self.timesteps[i + 1:i + 2])
            self.latents = (1 - self.mask) * known + self.mask * self.latents
        self.steps_done += 1
        if self.done:
            self.deep_features = None  # free them before the decode

    def decoder_input(self, latents: np.ndarray | None = None) -> np.ndarray:
        """Latents in the VAE decoder's scale (the final ones unless others are given)."""
        x = self.latents if latents is None else latents
        if self.spec.vae_decoder is None:
            return x.astype(np.float32)
        return self.spec.to_vae(x)


class DiffusionPipeline:
    """Tokenize -> encode -> denoising loop with classifier-free guidance -> decode, for any
    family: `spec` says what the graphs are, `conditioner` what the denoiser is conditioned on."""

    def __init__(self, backend: InferenceBackend, spec: DiffusionSpec, conditioner: Conditioner,
                 denoiser: Denoiser = UNET):
        self.backend = backend
        self.spec = spec
        self.name = spec.name
        self.conditioner = conditioner
        self.denoiser = denoiser
        self.schedulers = supported_schedulers(spec.scheduler_config)  # what a request may pick
        if not self.schedulers:
            raise ValueError(f"pipeline {spec.name!r}: no scheduler here can be built from its scheduler config")
        self.default_scheduler = spec.default_scheduler(self.schedulers)
        self.control: ControlNets | None = None  # set by families whose denoiser takes ControlNet residuals
        self.adapters: PipelineAdapters | None = None  # set by families that serve LoRA adapters

    def check_adapters(self, req: DiffusionRequest, limit: int | None = None) -> None:
        """Refuses `req.lora` this pipeline cannot serve (InvalidRequest naming `lora`)."""
        if not req.lora:
            return
        if self.adapters is None:
            raise InvalidRequest(f"model {self.name!r} ({self.spec.family}) takes no LoRA adapters here",
                                 field="lora")
        self.adapters.check(req.lora, req.cache_interval, limit)

    async def load_adapters(self, req: DiffusionRequest) -> None:
        """Before queuing: checks `req.lora` and loads the adapters not loaded yet (first use
        pays); the caller admits it before its next await (resolve_adapters)."""
        self.check_adapters(req)
        if req.lora and self.adapters is not None:
            await self.adapters.ensure(req.lora)

    def resolve_adapters(self, req: DiffusionRequest) -> None:
        """At admission: the loads of the request's adapters (loaded: PipelineAdapters.ensure)
        that its rows and texts name until it ends."""
        self.check_adapters(req)
        if req.lora and self.adapters is not None:
            req.adapter_loads = self.adapters.resolve(req.lora)

    # -- what the engine calls -----------------------------------------------------------
    def tokenize(self, req: DiffusionRequest) -> list[np.ndarray]:
        return self.conditioner.tokenize(req)

    @property
    def empty_prompt_key(self) -> np.ndarray | None:
        return self.conditioner.empty_key

    async def encode_prompts(self, keys: list[np.ndarray]) -> list[Any]:
        return await self.conditioner.encode(keys)

    async def start(self, req: DiffusionRequest, encoded: list[Any]) -> Trajectory:
        """A trajectory from the request's encoded texts ([negative, positive] or [positive])."""
        rngs = [np.random.default_rng(req.seed + i) for i in range(req.num_images)]
        image_latents = None
        if req.init_image is not None:
            image_latents = await self.encode_image(req.init_image, req.num_images, rngs)
        guided = self.spec.classifier_free(req)
        cond = self.conditioner.rows(req, encoded, guided=guided)
        if req.lora and self.adapters is not None:  # every row, both halves with guidance, as diffusers
            cond.update(self.adapters.rows(req.lora, req.adapter_loads, req.num_images * (2 if guided else 1)))
        return Trajectory(self.spec, req, cond, rngs, image_latents, self.denoiser)

    async def denoise(self, inputs: dict[str, np.ndarray],
                      keep_features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """One denoiser call over the rows of any number of trajectories: the shallow graph
        when the rows carry deep features (DeepCache), else the full one. Returns the
        prediction and, with `keep_features`, the full graph's deep features (None otherwise:
        they are not fetched)."""
        shallow = DEEP_FEATURES in inputs
        wanted = [self.spec.output_name]
        if keep_features and not shallow:
            wanted.append(DEEP_FEATURES)
        model = self.spec.denoiser
        if shallow:
            if self.spec.shallow_denoiser is None:
                raise ValueError(f"{self.spec.name}: rows with deep features, but no shallow U-Net is served")
            model = self.spec.shallow_denoiser
        if shallow:  # it may not read every input of the full graph (the text, without cross attention)
            inputs = {t.name: inputs[t.name] for t in self.backend.models()[model].inputs}
        elif self.control is not None:  # the ControlNets' residuals (zeros for rows without control)
            inputs = await self.control.unet_inputs(inputs)
        if self.adapters is not None:  # the rows' adapters as the graph's slot inputs
            inputs = self.adapters.call_inputs(model, inputs)
        out = await self.backend.infer(model, inputs, wanted)
        return out[self.spec.output_name], out.get(DEEP_FEATURES)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        if self.spec.vae_decoder is None:
            return np.clip(latents, -1.0, 1.0)
        images = (await self.backend.infer(self.spec.vae_decoder, {"latent_sample": latents}))["sample"]
        return np.clip(images, -1.0, 1.0)

    def warmup_request(self) -> DiffusionRequest:
        """A one-step request at the native size (with guidance where the family has text)."""
        return DiffusionRequest(prompt="", num_inference_steps=1, scheduler=self.default_scheduler,
                                guidance_scale=2.0 if self.conditioner.empty_key is not None else 0.0)

    async def encode_image(self, image: np.ndarray, n: int, rngs: list[np.random.Generator]) -> np.ndarray:
        """[C, H, W] in [-1, 1] -> n scaled latents sampled from the VAE posterior."""
        if self.spec.vae_encoder is None:
            raise ValueError(f"pipeline {self.name!r} has no VAE encoder")
        params = (await self.backend.infer(self.spec.vae_encoder, {"sample": image[None].astype(np.float32)}))[
            "latent_parameters"][0]
        mean, std = gaussian_posterior(params)
        samples = np.stack([mean + std * rng.standard_normal(mean.shape, dtype=np.float32) for rng in rngs])
        return self.spec.from_vae(samples)

    # -- one request alone ---------------------------------------------------------------
    async def __call__(self, req: DiffusionRequest) -> DiffusionOutput:
        """One request alone: encode, denoise, decode (the engine does the same, batched)."""
        timings: dict[str, float] = {}
        # 1. Encode the texts; with guidance, [negative, positive].
        await self.load_adapters(req)
        self.resolve_adapters(req)
        t0 = time.perf_counter()
        keys = self.tokenize(req)
        encoded = await self.encode_prompts(keys) if keys else []
        timings["text_encoding_seconds"] = time.perf_counter() - t0

        # 2. Prepare timesteps and latents (see the module docstring for the draw order).
        t0 = time.perf_counter()
        trajectory = await self.start(req, encoded)
        timings["latent_preparation_seconds"] = time.perf_counter() - t0

        # 3. Denoising loop: one denoiser call per step for every image, cond and uncond.
        t0 = time.perf_counter()
        while not trajectory.done:
            trajectory.advance(*await self.denoise(trajectory.model_inputs(), trajectory.caching))
        timings["denoising_seconds"] = time.perf_counter() - t0

        # 4. Decode.
        t0 = time.perf_counter()
        images = await self.decode(trajectory.decoder_input())
        timings["decoding_seconds"] = time.perf_counter() - t0
        return DiffusionOutput(images, [req.seed + i for i in range(req.num_images)], timings)
