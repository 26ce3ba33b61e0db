"""GAN sampling: seeded latents, truncation, class conditioning, one generator call per batch.

Determinism rule (README, "Reproducing an image"): image i of a request with seed s uses
    rng = numpy.random.default_rng(s + i)
    z   = truncation_psi * rng.standard_normal(latent_shape, dtype=float32)
    label (conditional models, when the request names none) = rng.integers(num_classes)
so an image never depends on its batch-mates, and image i is reproduced alone by
seed s + i with num_images 1. `latent_shape` is the config's `genserve.latent_shape` ("100,1,1"
for a generator taking z as a map), else (`genserve.latent_dim`,); the draws are the same values
in the same order whatever the shape, so a map latent equals the vector one reshaped.

Truncation pulls z toward the mean of its prior (0 for a standard normal) — the
truncation trick of BigGAN/StyleGAN applied in Z: psi = 1 keeps the full diversity,
psi -> 0 trades diversity for typicality.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from services.contract import GeneratorFacts
from services.errors import BackendUnavailable
from services.runtime import InferenceBackend

log = logging.getLogger("genserve.gan")


# What the pipeline knows about a generator: the contract's type, which the exporter writes.
GANModelInfo = GeneratorFacts


@dataclass
class GANOutput:
    images: np.ndarray  # [N, C, H, W] in the model's output range
    seeds: list[int]  # [N] per-image seeds (seed + i)
    class_labels: list[int] | None  # [N] for conditional models
    inference_seconds: float


def prepare_latents(
    seed: int, num_images: int, latent_shape: int | tuple[int, ...], truncation_psi: float,
    num_classes: int = 0, class_label: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """z [N, *latent_shape] float32 and labels [N] int64 (None when unconditional)."""
    latent_shape = (latent_shape,) if isinstance(latent_shape, int) else tuple(latent_shape)
    z = np.empty((num_images, *latent_shape), dtype=np.float32)
    labels = np.empty(num_images, dtype=np.int64) if num_classes > 0 else None
    for i in range(num_images):
        rng = np.random.default_rng(seed + i)
        z[i] = rng.standard_normal(latent_shape, dtype=np.float32)
        if labels is not None:
            labels[i] = class_label if class_label is not None else rng.integers(num_classes)
    z *= np.float32(truncation_psi)
    return z, labels


class GANPipeline:
    def __init__(self, backend: InferenceBackend, model: str, retry_pause_s: float = 0.5):
        self.backend = backend
        self.model = model
        self.retry_pause_s = retry_pause_s  # pause before the one retry after a backend outage
        self.spec = backend.models()[model]
        self.info = GANModelInfo.from_spec(self.spec)

    async def __call__(
        self, seed: int, num_images: int, truncation_psi: float = 1.0, class_label: int | None = None,
    ) -> GANOutput:
        # 1. Latents and labels, one generator per image.
        z, labels = prepare_latents(
            seed, num_images, self.info.latent_shape, truncation_psi, self.info.num_classes, class_label
        )
        # 2. One generator call (the backend splits batches past the model's limit).
        feeds = {"z": z}
        if labels is not None:
            feeds["class_label"] = labels[:, None]  # wire shape [batch, 1]
        t0 = time.perf_counter()
        images = (await self._infer(feeds))["image"]
        elapsed = time.perf_counter() - t0
        return GANOutput(
            images=images,
            seeds=[seed + i for i in range(num_images)],
            class_labels=None if labels is None else labels.tolist(),
            inference_seconds=elapsed,
        )

    async def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One generator call, retried once after a short pause when the backend is
        unavailable: sampling is idempotent (same seeds, same images), and a dropped
        connection or a model reloading on Triton is often back within the pause (the
        Triton backend opens a fresh channel after a connection error). A second failure
        goes to the client as the 503 it is."""
        try:
            return await self.backend.infer(self.model, feeds)
        except BackendUnavailable as exc:
            log.warning("%s: backend unavailable, retrying once in %.2fs: %s", self.model, self.retry_pause_s, exc)
            await asyncio.sleep(self.retry_pause_s)
            return await self.backend.infer(self.model, feeds)
