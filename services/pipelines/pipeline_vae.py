"""VAEs on their own: encode an image to its posterior, decode latents, sample N(0, I),
walk the latent line between two points. Latents stay in the VAE's own latent space
(`AutoencoderKL.encode(x).latent_dist`, not multiplied by scaling_factor), so they
round-trip with diffusers code unchanged.

Served: every standalone VAE (export/vae.py, `genserve.pipeline = vae`) and the VAE of
every latent diffusion pipeline, under the pipeline's name.

Determinism: a posterior sample of seed s is mean + std * default_rng(s).standard_normal;
image i of /v1/vae/sample with seed s decodes default_rng(s + i).standard_normal((C, h, w)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.contract import TransformerFacts, UNetFacts, VAEFacts
from services.families import names
from services.pipelines.diffusion import gaussian_posterior
from services.runtime import InferenceBackend, ModelSpec

LATENT_FAMILIES = names(latent_vae=True)


@dataclass(frozen=True)
class VAEInfo:
    name: str
    family: str  # vae (standalone) or the pipeline family it belongs to
    decoder: str
    encoder: str | None
    latent_channels: int
    image_channels: int
    scale_factor: int
    native_size: int  # pixels
    size_multiple: int
    max_side_factor: int = 2

    @property
    def standalone(self) -> bool:
        return self.family == "vae"

    @property
    def max_side(self) -> int:
        return self.max_side_factor * self.native_size

    @property
    def native_latent(self) -> tuple[int, int, int]:
        side = self.native_size // self.scale_factor
        return (self.latent_channels, side, side)


def discover(models: dict[str, ModelSpec]) -> dict[str, VAEInfo]:
    groups: dict[str, dict[str, ModelSpec]] = {}
    for spec in models.values():
        p = spec.parameters
        if p.get("genserve.pipeline") in LATENT_FAMILIES and p.get("genserve.component") in ("vae_decoder",
                                                                                           "vae_encoder"):
            groups.setdefault(p["genserve.pipeline_name"], {})[p["genserve.component"]] = spec
    found = {}
    for name, parts in sorted(groups.items()):
        if "vae_decoder" not in parts:
            continue
        dec = parts["vae_decoder"]
        vae = VAEFacts.from_spec(dec)
        native = vae.native_height if vae.native_height is not None else _pipeline_native(models, name)
        found[name] = VAEInfo(
            name=name, family=dec.parameters["genserve.pipeline"], decoder=dec.name,
            encoder=parts["vae_encoder"].name if "vae_encoder" in parts else None,
            latent_channels=vae.latent_channels, image_channels=vae.image_channels,
            scale_factor=vae.vae_scale_factor, native_size=native,
            size_multiple=vae.size_multiple or vae.vae_scale_factor)
    return found


def _pipeline_native(models: dict[str, ModelSpec], name: str) -> int:
    """A pipeline's VAE has no size of its own: its denoiser's (a U-Net's, or FLUX's
    transformer's) native side in pixels."""
    for spec in models.values():
        p = spec.parameters
        if p.get("genserve.pipeline_name") != name:
            continue
        if p.get("genserve.component") == "unet":
            unet = UNetFacts.from_spec(spec)
            return max(unet.native_height, unet.native_width)
        if p.get("genserve.component") == "transformer":
            transformer = TransformerFacts.from_spec(spec)
            return max(transformer.native_height, transformer.native_width)
    raise ValueError(f"pipeline {name!r} has a VAE but no denoiser to size it by")


class VAEPipeline:
    def __init__(self, backend: InferenceBackend, info: VAEInfo):
        self.backend = backend
        self.info = info

    async def posterior(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[C, H, W] in [-1, 1] -> (mean, std), each [C_lat, H/f, W/f]."""
        if self.info.encoder is None:
            raise ValueError(f"{self.info.name!r} has no VAE encoder")
        params = (await self.backend.infer(self.info.encoder, {"sample": image[None].astype(np.float32)}))[
            "latent_parameters"][0]
        return gaussian_posterior(params)

    async def encode(self, image: np.ndarray, seed: int | None = None) -> np.ndarray:
        """The posterior mean, or with a seed a sample drawn from it: [1, C_lat, h, w]."""
        mean, std = await self.posterior(image)
        if seed is None:
            return mean[None].astype(np.float32)
        eps = np.random.default_rng(seed).standard_normal(mean.shape, dtype=np.float32)
        return (mean + std * eps)[None].astype(np.float32)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        """[N, C_lat, h, w] -> [N, C, H, W] in [-1, 1]."""
        images = (await self.backend.infer(self.info.decoder, {"latent_sample": latents.astype(np.float32)}))["sample"]
        return np.clip(images, -1.0, 1.0)

    def prior_latents(self, seed: int, num_images: int) -> np.ndarray:
        """N(0, I) at the native latent size, image i from default_rng(seed + i)."""
        return np.stack([np.random.default_rng(seed + i).standard_normal(self.info.native_latent, dtype=np.float32)
                         for i in range(num_images)])

    @staticmethod
    def line(a: np.ndarray, b: np.ndarray, frames: int) -> np.ndarray:
        """`frames` points from a to b on the straight latent line, ends included."""
        t = np.linspace(0.0, 1.0, frames, dtype=np.float32).reshape(-1, 1, 1, 1)
        return ((1 - t) * a + t * b).astype(np.float32)


def vae_pipelines(backend: InferenceBackend) -> dict[str, VAEPipeline]:
    return {name: VAEPipeline(backend, info) for name, info in discover(backend.models()).items()}

