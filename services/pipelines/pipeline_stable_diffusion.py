"""Latent diffusion, torch-free: tokenize -> text encoder -> denoising loop with
classifier-free guidance -> VAE decode; plus image-to-image and inpainting.

Determinism rule (README, "Reproducing an image"): image i of a request with seed s
draws everything random from its own `rng = numpy.random.default_rng(s + i)`, in order:
  txt2img  latents = rng.standard_normal((C, H/f, W/f), dtype=float32) * init_noise_sigma
  img2img  VAE posterior sample eps_q, then the forward-noise eps_n (both that shape):
           latents = add_noise(scaling_factor * (mean + std * eps_q), eps_n, t_start)
  then     per step, the ancestral noise of stochastic schedulers (DDPM, Euler a).
So an image never depends on its batch-mates, and the txt2img latents can be handed to
diffusers' `StableDiffusionPipeline(latents=...)` to reproduce an image there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.runtime import InferenceBackend, ModelSpec
from services.schedulers import make_scheduler


class PromptTooLong(ValueError):
    def __init__(self, field_name: str, tokens: int, limit: int):
        super().__init__(f"{field_name} is {tokens} tokens long; the text encoder takes at most {limit}")
        self.field_name, self.tokens, self.limit = field_name, tokens, limit


@dataclass(frozen=True)
class StableDiffusionModels:
    """One SD-format pipeline in the repository: its graphs and the files beside them."""

    name: str
    text_encoder: str
    unet: str
    vae_decoder: str
    vae_encoder: str | None
    tokenizer_file: Path
    scheduler_config: dict
    max_length: int
    pad_token_id: int
    latent_channels: int
    image_channels: int
    vae_scale_factor: int
    scaling_factor: float
    native_size: int  # pixels: the U-Net's sample_size times the VAE factor
    size_multiple: int  # output sides must be multiples of this (VAE and U-Net downsampling)


def discover_stable_diffusion(models: dict[str, ModelSpec]) -> dict[str, StableDiffusionModels]:
    """Groups the repository's `genserve.pipeline = stable_diffusion` graphs by pipeline name."""
    groups: dict[str, dict[str, ModelSpec]] = {}
    for spec in models.values():
        p = spec.parameters
        if p.get("genserve.pipeline") == "stable_diffusion":
            groups.setdefault(p["genserve.pipeline_name"], {})[p["genserve.component"]] = spec
    found = {}
    for name, parts in sorted(groups.items()):
        missing = {"text_encoder", "unet", "vae_decoder"} - set(parts)
        if missing:
            raise ValueError(f"pipeline {name!r} lacks {sorted(missing)} in the repository")
        te, unet, dec = parts["text_encoder"], parts["unet"], parts["vae_decoder"]
        found[name] = StableDiffusionModels(
            name=name,
            text_encoder=te.name, unet=unet.name, vae_decoder=dec.name,
            vae_encoder=parts["vae_encoder"].name if "vae_encoder" in parts else None,
            tokenizer_file=te.model_dir / "tokenizer.json",
            scheduler_config=json.loads((unet.model_dir / "scheduler_config.json").read_text()),
            max_length=int(te.parameters["genserve.max_length"]),
            pad_token_id=int(te.parameters["genserve.pad_token_id"]),
            latent_channels=int(dec.parameters["genserve.latent_channels"]),
            image_channels=int(dec.parameters["genserve.image_channels"]),
            vae_scale_factor=int(dec.parameters["genserve.vae_scale_factor"]),
            scaling_factor=float(dec.parameters["genserve.scaling_factor"]),
            native_size=int(unet.parameters["genserve.sample_size"]) * int(dec.parameters["genserve.vae_scale_factor"]),
            size_multiple=int(unet.parameters["genserve.size_multiple"]),
        )
    return found


class PromptTokenizer:
    """CLIP tokenization with the `tokenizers` library (no torch, no transformers): ids are
    bos, tokens, eos, then padding to max_length, exactly what diffusers feeds its text
    encoder. A prompt that does not fit is refused, never silently truncated."""

    def __init__(self, path: Path, max_length: int, pad_token_id: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __call__(self, text: str, field_name: str = "prompt") -> np.ndarray:
        ids = self.tokenizer.encode(text).ids
        if len(ids) > self.max_length:
            raise PromptTooLong(field_name, len(ids), self.max_length)
        return np.asarray(ids + [self.pad_token_id] * (self.max_length - len(ids)), dtype=np.int64)


@dataclass
class DiffusionRequest:
    prompt: str
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


@dataclass
class DiffusionOutput:
    images: np.ndarray  # [N, C, H, W] in [-1, 1]
    seeds: list[int]  # [N]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def initial_latents(seed: int, num_images: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    """The documented per-image starting noise, before scaling by init_noise_sigma."""
    return [np.random.default_rng(seed + i).standard_normal(shape, dtype=np.float32) for i in range(num_images)]


def img2img_timesteps(scheduler, num_inference_steps: int, strength: float) -> np.ndarray:
    """The tail of the schedule an image of `strength` starts from (diffusers' get_timesteps)."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return scheduler.timesteps[t_start:]


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """[H, W] -> [1, H/f, W/f] by taking every f-th pixel (nearest), as diffusers does for the
    latent mask with `interpolate(..., size=latent_size)` in its default nearest mode."""
    return mask[::factor, ::factor][None].astype(np.float32)


class Trajectory:
    """One request's denoising state: the body of diffusers' loop, split at the U-Net call.

    `model_inputs()` gives this step's U-Net rows ([negative, positive] halves with
    guidance), `advance(noise_pred)` applies guidance, the scheduler step and, for
    inpainting, latent blending. A single request runs one trajectory; the engine runs
    many side by side, sharing each U-Net call (per-sample timesteps make that exact).
    """

    def __init__(self, models: StableDiffusionModels, req: DiffusionRequest, text: np.ndarray,
                 rngs: list[np.random.Generator], image_latents: np.ndarray | None = None):
        self.req = req
        self.rngs = rngs
        self.do_cfg = req.guidance_scale > 1.0  # as diffusers: guidance 1 is the conditional model alone
        self.text = text  # [2N or N, L, D], negative half first
        self.scaling_factor = models.scaling_factor
        height, width = req.height or models.native_size, req.width or models.native_size
        latent_shape = (models.latent_channels, height // models.vae_scale_factor, width // models.vae_scale_factor)

        # Timesteps (img2img and inpainting start part-way, at `strength`).
        self.scheduler = make_scheduler(req.scheduler, models.scheduler_config)
        self.scheduler.set_timesteps(req.num_inference_steps)
        self.timesteps = self.scheduler.timesteps
        if req.init_image is not None:
            self.timesteps = img2img_timesteps(self.scheduler, req.num_inference_steps, req.strength)

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
                self.mask = downsample_mask(req.mask, models.vae_scale_factor)
        self.steps_done = 0
        self.pred_original_sample: np.ndarray | None = None  # latest x0 estimate, for previews

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.steps_done >= self.num_steps

    @property
    def rows(self) -> int:
        """U-Net batch rows this trajectory needs per step."""
        return len(self.text)

    def model_inputs(self) -> dict[str, np.ndarray]:
        t = self.timesteps[self.steps_done]
        sample = np.concatenate([self.latents, self.latents]) if self.do_cfg else self.latents
        sample = self.scheduler.scale_model_input(sample, t).astype(np.float32)
        return {"sample": sample, "timestep": np.full((len(sample), 1), t, dtype=np.float32),
                "encoder_hidden_states": self.text}

    def advance(self, noise_pred: np.ndarray) -> None:
        i, t = self.steps_done, self.timesteps[self.steps_done]
        if self.do_cfg:
            n = len(self.latents)
            uncond, cond = noise_pred[:n], noise_pred[n:]
            noise_pred = uncond + np.float32(self.req.guidance_scale) * (cond - uncond)
        out = self.scheduler.step(noise_pred, t, self.latents, generator=self.rngs)
        self.latents, self.pred_original_sample = out.prev_sample, out.pred_original_sample
        if self.mask is not None:
            # Latent blending: outside the mask, the original image noised to the next level.
            known = self.image_latents
            if i < self.num_steps - 1:
                known = self.scheduler.add_noise(self.image_latents, self.noise, self.timesteps[i + 1:i + 2])
            self.latents = (1 - self.mask) * known + self.mask * self.latents
        self.steps_done += 1

    def decoder_input(self, latents: np.ndarray | None = None) -> np.ndarray:
        """Latents in the VAE decoder's scale (the final ones unless others are given)."""
        x = self.latents if latents is None else latents
        return (x / np.float32(self.scaling_factor)).astype(np.float32)


class StableDiffusionPipeline:
    def __init__(self, backend: InferenceBackend, models: StableDiffusionModels):
        self.backend = backend
        self.models = models
        self.tokenizer = PromptTokenizer(models.tokenizer_file, models.max_length, models.pad_token_id)

    def tokenize(self, req: DiffusionRequest) -> list[np.ndarray]:
        """Token ids: [negative, positive] with guidance, [positive] without."""
        ids = [self.tokenizer(req.prompt, "prompt")]
        if req.guidance_scale > 1.0:
            ids.insert(0, self.tokenizer(req.negative_prompt, "negative_prompt"))
        return ids

    async def encode_prompts(self, ids: list[np.ndarray]) -> np.ndarray:
        """[T, L] token ids -> [T, L, D] embeddings, one text-encoder call."""
        return (await self.backend.infer(self.models.text_encoder, {"input_ids": np.stack(ids)}))["last_hidden_state"]

    async def start(self, req: DiffusionRequest, embeddings: np.ndarray) -> Trajectory:
        """A trajectory from the prompt's embeddings ([negative, positive] or [positive])."""
        rngs = [np.random.default_rng(req.seed + i) for i in range(req.num_images)]
        image_latents = None
        if req.init_image is not None:
            image_latents = await self.encode_image(req.init_image, req.num_images, rngs)
        return Trajectory(self.models, req, np.repeat(embeddings, req.num_images, axis=0), rngs, image_latents)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        images = (await self.backend.infer(self.models.vae_decoder, {"latent_sample": latents}))["sample"]
        return np.clip(images, -1.0, 1.0)

    async def __call__(self, req: DiffusionRequest) -> DiffusionOutput:
        """One request alone: encode, denoise, decode."""
        timings: dict[str, float] = {}
        # 1. Encode the prompt; with guidance, [negative, positive] in one text-encoder call.
        t0 = time.perf_counter()
        embeddings = await self.encode_prompts(self.tokenize(req))
        timings["text_encoding_seconds"] = time.perf_counter() - t0

        # 2. Prepare timesteps and latents (see the module docstring for the draw order).
        t0 = time.perf_counter()
        trajectory = await self.start(req, embeddings)
        timings["latent_preparation_seconds"] = time.perf_counter() - t0

        # 3. Denoising loop: one U-Net call per step for every image, cond and uncond.
        t0 = time.perf_counter()
        while not trajectory.done:
            outputs = await self.backend.infer(self.models.unet, trajectory.model_inputs())
            trajectory.advance(outputs["noise_pred"])
        timings["denoising_seconds"] = time.perf_counter() - t0

        # 4. Decode.
        t0 = time.perf_counter()
        images = await self.decode(trajectory.decoder_input())
        timings["decoding_seconds"] = time.perf_counter() - t0
        return DiffusionOutput(images, [req.seed + i for i in range(req.num_images)], timings)

    async def encode_image(self, image: np.ndarray, n: int, rngs: list[np.random.Generator]) -> np.ndarray:
        """[C, H, W] in [-1, 1] -> n scaled latents sampled from the VAE posterior."""
        if self.models.vae_encoder is None:
            raise ValueError(f"pipeline {self.models.name!r} has no VAE encoder")
        params = (await self.backend.infer(self.models.vae_encoder, {"sample": image[None].astype(np.float32)}))[
            "latent_parameters"][0]
        mean, logvar = np.split(params, 2, axis=0)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
        samples = np.stack([mean + std * rng.standard_normal(mean.shape, dtype=np.float32) for rng in rngs])
        return (samples * np.float32(self.models.scaling_factor)).astype(np.float32)
