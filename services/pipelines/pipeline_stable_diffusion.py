"""The Stable Diffusion 1.x/2.x family: one CLIP text encoder whose last hidden state
conditions the U-Net; the rest is the generic pipeline (services.pipelines.diffusion).

Graphs (export/stable_diffusion.py): <name>_text_encoder, <name>_unet, <name>_vae_decoder,
<name>_vae_encoder, with tokenizer.json and scheduler_config.json beside them, and
<name>_unet_shallow where the U-Net was exported for DeepCache (requests' cache_interval).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.adapter_library import pipeline_adapters
from services.adapters import PipelineAdapters
from services.contract import TextEncoderFacts, UNetFacts, VAEFacts
from services.pipelines.controlnet import ControlNets
from services.pipelines.controlnet import discover as discover_controlnets
from services.pipelines.diffusion import (  # noqa: F401 - re-exported for the family's users
    DiffusionOutput,
    DiffusionPipeline,
    DiffusionRequest,
    DiffusionSpec,
    PromptTokenizer,
    PromptTooLong,
    Trajectory,
    downsample_mask,
    img2img_timesteps,
    initial_latents,
    shallow_denoiser,
)
from services.runtime import InferenceBackend, ModelSpec


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
    native_height: int  # pixels: the U-Net's sample_size (an int or [height, width]) times the VAE factor
    native_width: int
    size_multiple: int  # output sides must be multiples of this (VAE and U-Net downsampling)
    unet_shallow: str | None = None  # DeepCache's shallow U-Net (export/deepcache.py), when exported

    def spec(self) -> DiffusionSpec:
        return DiffusionSpec(
            name=self.name, family="stable_diffusion", denoiser=self.unet, scheduler_config=self.scheduler_config,
            latent_channels=self.latent_channels, image_channels=self.image_channels,
            vae_scale_factor=self.vae_scale_factor, native_height=self.native_height,
            native_width=self.native_width,
            size_multiple=self.size_multiple, vae_decoder=self.vae_decoder, vae_encoder=self.vae_encoder,
            scaling_factor=self.scaling_factor, shallow_denoiser=self.unet_shallow,
            components=tuple(c for c in (self.text_encoder, self.unet, self.unet_shallow, self.vae_decoder,
                                         self.vae_encoder) if c))


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
        text, denoiser, vae = TextEncoderFacts.from_spec(te), UNetFacts.from_spec(unet), VAEFacts.from_spec(dec)
        found[name] = StableDiffusionModels(
            name=name,
            text_encoder=te.name, unet=unet.name, vae_decoder=dec.name,
            vae_encoder=parts["vae_encoder"].name if "vae_encoder" in parts else None,
            tokenizer_file=te.file("tokenizer.json"),
            scheduler_config=json.loads(unet.file("scheduler_config.json").read_text()),
            max_length=text.max_length,
            pad_token_id=text.pad_token_id,
            latent_channels=vae.latent_channels,
            image_channels=vae.image_channels,
            vae_scale_factor=vae.vae_scale_factor,
            scaling_factor=vae.scaling_factor,
            native_height=denoiser.native_height,
            native_width=denoiser.native_width,
            size_multiple=denoiser.size_multiple,
            unet_shallow=shallow_denoiser(unet, parts.get("unet_shallow")),
        )
    return found


class ClipConditioner:
    """SD 1/2: one tokenizer, one text encoder; its last hidden state is the U-Net's
    `encoder_hidden_states`, repeated per image. A request's adapters acting on the text
    encoder are part of its texts' keys (PipelineAdapters.text_key)."""

    def __init__(self, backend: InferenceBackend, models: StableDiffusionModels,
                 adapters: PipelineAdapters):
        self.backend = backend
        self.text_encoder = models.text_encoder
        self.tokenizer = PromptTokenizer(models.tokenizer_file, models.max_length, models.pad_token_id)
        self.empty_key = self.tokenizer("")
        self.max_tokens = models.max_length
        self.adapters = adapters

    def tokenize(self, req: DiffusionRequest) -> list[np.ndarray]:
        ids = [self.tokenizer(req.prompt, "prompt")]
        if req.guidance_scale > 1.0:
            ids.insert(0, self.tokenizer(req.negative_prompt, "negative_prompt"))
        if req.lora:
            ids = [self.adapters.text_key(x, req.lora, req.adapter_loads, (self.text_encoder,)) for x in ids]
        return ids

    async def encode(self, keys: list[np.ndarray]) -> list[np.ndarray]:
        """T keys -> T embeddings [L, D], one text-encoder call (rows with adapters and
        without side by side)."""
        ids, scales = self.adapters.text_rows(keys, self.max_tokens)
        inputs = self.adapters.call_inputs(self.text_encoder, {"input_ids": ids, **scales})
        out = await self.backend.infer(self.text_encoder, inputs)
        return list(out["last_hidden_state"])

    def rows(self, req: DiffusionRequest, encoded: list[Any], guided: bool) -> dict[str, np.ndarray]:
        return {"encoder_hidden_states": np.repeat(np.stack(encoded), req.num_images, axis=0)}


class StableDiffusionPipeline(DiffusionPipeline):
    def __init__(self, backend: InferenceBackend, models: StableDiffusionModels):
        adapters = pipeline_adapters(backend, models.name, backend.models()[models.unet],
                                     (models.unet, models.text_encoder))
        conditioner = ClipConditioner(backend, models, adapters)
        super().__init__(backend, models.spec(), conditioner)
        self.adapters = adapters
        self.models = models
        self.tokenizer = conditioner.tokenizer
        unet = backend.models()[models.unet]
        if ControlNets.accepts(unet):  # a U-Net exported with ControlNet residual inputs
            self.control = ControlNets(backend, unet, discover_controlnets(backend.models(), models.name))


def pipelines(backend: InferenceBackend) -> dict[str, StableDiffusionPipeline]:
    return {name: StableDiffusionPipeline(backend, models)
            for name, models in discover_stable_diffusion(backend.models()).items()}
