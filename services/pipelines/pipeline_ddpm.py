"""Pixel-space DDPM/DDIM (diffusers UNet2DModel), class-conditional or not: no text, no
VAE; the denoiser sees the image itself. Everything but the conditioning is the generic
pipeline (services.pipelines.diffusion), so requests batch on the step engine like any
other family.

Determinism: image i of seed s draws x_T = default_rng(s + i).standard_normal((C, H, W)),
then the per-step noise of stochastic schedulers from the same generator, in order. A
class label not given is default_rng(s + i).integers(num_classes) from a generator of its
own (drawn by the HTTP layer), so x_T does not depend on whether a label was given.
Graphs and parameters: export/ddpm.py.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from services.contract import UNetFacts
from services.pipelines.diffusion import DiffusionPipeline, DiffusionRequest, DiffusionSpec
from services.runtime import InferenceBackend, ModelSpec


def discover(models: dict[str, ModelSpec]) -> dict[str, tuple[DiffusionSpec, int]]:
    """`genserve.pipeline = ddpm` graphs: name -> (spec, num_classes)."""
    found = {}
    for spec in models.values():
        p = spec.parameters
        if p.get("genserve.pipeline") != "ddpm" or p.get("genserve.component") != "unet":
            continue
        name, unet = p["genserve.pipeline_name"], UNetFacts.from_spec(spec)
        num_classes = unet.num_classes or 0
        found[name] = (DiffusionSpec(
            name=name, family="ddpm", denoiser=spec.name,
            scheduler_config=json.loads(spec.file("scheduler_config.json").read_text()),
            latent_channels=unet.in_channels, image_channels=unet.in_channels,
            vae_scale_factor=1, native_height=unet.native_height,
            native_width=unet.native_width, size_multiple=unet.size_multiple,
            conditioning="class" if num_classes else "none", components=(spec.name,)), num_classes)
    return dict(sorted(found.items()))


class ClassConditioner:
    """Class labels per image (wire shape [rows, 1]); nothing for unconditional models."""

    empty_key: np.ndarray | None = None  # no text

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def tokenize(self, req: DiffusionRequest) -> list[np.ndarray]:
        return []

    async def encode(self, keys: list[np.ndarray]) -> list[Any]:
        return []

    def rows(self, req: DiffusionRequest, encoded: list[Any], guided: bool) -> dict[str, np.ndarray]:
        if not self.num_classes:
            return {}
        labels = np.asarray(req.class_labels, dtype=np.int64)[:, None]
        return {"class_labels": np.concatenate([labels, labels]) if guided else labels}


class DDPMPipeline(DiffusionPipeline):
    def __init__(self, backend: InferenceBackend, spec: DiffusionSpec, num_classes: int):
        super().__init__(backend, spec, ClassConditioner(num_classes))
        self.num_classes = num_classes

    def warmup_request(self) -> DiffusionRequest:
        return DiffusionRequest(num_inference_steps=1, guidance_scale=0.0,
                                class_labels=[0] if self.num_classes else None)


def pipelines(backend: InferenceBackend) -> dict[str, DDPMPipeline]:
    return {name: DDPMPipeline(backend, spec, num_classes)
            for name, (spec, num_classes) in discover(backend.models()).items()}
