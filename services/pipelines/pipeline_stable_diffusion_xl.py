"""The Stable Diffusion XL family: two CLIP text encoders (penultimate hidden states,
concatenated; the second's pooled, projected output), and size micro-conditioning
(`time_ids`); the rest is the generic pipeline (services.pipelines.diffusion).

As diffusers' StableDiffusionXLPipeline:
  - encoder_hidden_states = concat(text_encoder.hidden_states[-2], text_encoder_2.hidden_states[-2])
    (text_encoder_2's alone for refiner-style folders), text_embeds = text_encoder_2's pooled;
  - with guidance and no negative prompt (empty: diffusers' `negative_prompt=None`), a
    folder with `force_zeros_for_empty_prompt` gets zero hidden states and pooled for the
    negative half instead of encoding "";
  - time_ids = original_size + crops_coords_top_left + target_size (defaults: the output
    size, (0, 0)), the same for both halves; aesthetics models (5 ids) end with the
    aesthetic score instead of the target size: 6.0, and 2.5 for the negative half;
  - the VAE's latents_mean/latents_std, when it has them, scale latents per channel; its
    shift_factor is not used (diffusers' SDXL pipelines do not).
Graphs and parameters: export/stable_diffusion_xl.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.adapter_library import pipeline_adapters
from services.adapters import PipelineAdapters
from services.contract import TextEncoderFacts, UNetFacts, VAEFacts, refuse
from services.pipelines.controlnet import ControlNets
from services.pipelines.controlnet import discover as discover_controlnets
from services.pipelines.diffusion import (
    DiffusionPipeline,
    DiffusionRequest,
    DiffusionSpec,
    PromptTokenizer,
    shallow_denoiser,
)
from services.runtime import InferenceBackend, ModelSpec

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' defaults
SIZE_FIELDS = ("original_size", "target_size", "crops_coords_top_left")


@dataclass(frozen=True)
class TextEncoder:
    model: str
    tokenizer: PromptTokenizer
    pooled: bool  # its `pooled` output is the U-Net's text_embeds


def discover(models: dict[str, ModelSpec]) -> dict[str, tuple[DiffusionSpec, list[TextEncoder], UNetFacts]]:
    """Groups the repository's `genserve.pipeline = stable_diffusion_xl` graphs by pipeline:
    name -> (spec, text encoders in order, U-Net facts)."""
    groups: dict[str, dict[str, ModelSpec]] = {}
    for model in models.values():
        p = model.parameters
        if p.get("genserve.pipeline") == "stable_diffusion_xl":
            groups.setdefault(p["genserve.pipeline_name"], {})[p["genserve.component"]] = model
    found = {}
    for name, parts in sorted(groups.items()):
        missing = {"text_encoder_2", "unet", "vae_decoder"} - set(parts)
        if missing:
            raise ValueError(f"SDXL pipeline {name!r} lacks {sorted(missing)} in the repository")
        encoders = []
        for role in ("text_encoder", "text_encoder_2"):
            if role in parts:
                te = TextEncoderFacts.from_spec(parts[role])
                encoders.append(TextEncoder(parts[role].name, PromptTokenizer(
                    parts[role].file("tokenizer.json"), te.max_length, te.pad_token_id), bool(te.pooled)))
        unet, dec = parts["unet"], parts["vae_decoder"]
        u, d = UNetFacts.from_spec(unet), VAEFacts.from_spec(dec)
        if u.num_time_ids is None:
            raise refuse(unet.parameters, unet.name, "its config lacks genserve.num_time_ids (an SDXL U-Net's)")
        spec = DiffusionSpec(
            name=name, family="stable_diffusion_xl", denoiser=unet.name,
            scheduler_config=json.loads(unet.file("scheduler_config.json").read_text()),
            latent_channels=d.latent_channels, image_channels=d.image_channels,
            vae_scale_factor=d.vae_scale_factor, native_height=u.native_height,
            native_width=u.native_width, size_multiple=u.size_multiple,
            vae_decoder=dec.name, vae_encoder=parts["vae_encoder"].name if "vae_encoder" in parts else None,
            scaling_factor=d.scaling_factor, latents_mean=d.latents_mean, latents_std=d.latents_std,
            extra_fields=SIZE_FIELDS, shallow_denoiser=(shallow := shallow_denoiser(unet, parts.get("unet_shallow"))),
            components=tuple(p.name for role, p in sorted(parts.items()) if role != "unet_shallow" or shallow))
        found[name] = (spec, encoders, u)
    return found


class SDXLConditioner:
    """A request's adapters acting on either text encoder are part of its texts' keys
    (PipelineAdapters.text_key), after both tokenizers' ids."""

    def __init__(self, backend: InferenceBackend, spec: DiffusionSpec, encoders: list[TextEncoder],
                 unet: UNetFacts, adapters: PipelineAdapters):
        self.backend = backend
        self.adapters = adapters
        self.native = (spec.native_height, spec.native_width)
        self.encoders = encoders
        self.num_time_ids = unet.num_time_ids
        # diffusers registers force_zeros_for_empty_prompt=True when model_index.json has none
        self.force_zeros = unet.force_zeros_for_empty_prompt is not False
        self.max_tokens = min(e.tokenizer.max_length for e in encoders)
        self.empty_key = self._key("", "prompt")

    def _key(self, text: str, field_name: str) -> np.ndarray:
        """Every tokenizer's ids, end to end: one text's cache key and encoder inputs."""
        return np.concatenate([e.tokenizer(text, field_name) for e in self.encoders])

    def tokenize(self, req: DiffusionRequest) -> list[np.ndarray]:
        keys = [self._key(req.prompt, "prompt")]
        if req.guidance_scale > 1.0:
            keys.insert(0, self._key(req.negative_prompt, "negative_prompt"))
        if req.lora:
            graphs = [e.model for e in self.encoders]
            keys = [self.adapters.text_key(k, req.lora, req.adapter_loads, graphs) for k in keys]
        return keys

    async def encode(self, keys: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Both encoders, one call each for all texts (rows with adapters and without side by
        side): hidden states concatenated, pooled."""
        ids, scales = self.adapters.text_rows(keys, sum(e.tokenizer.max_length for e in self.encoders))
        hidden, pooled, offset = [], None, 0
        for e in self.encoders:
            length = e.tokenizer.max_length
            inputs = self.adapters.call_inputs(e.model, {"input_ids": ids[:, offset:offset + length], **scales})
            out = await self.backend.infer(e.model, inputs)
            offset += length
            hidden.append(out["hidden_states"])
            if e.pooled and pooled is None:
                pooled = out["pooled"]
        if pooled is None:
            raise ValueError("an SDXL pipeline needs a text encoder with pooled output (text_encoder_2)")
        return [{"hidden": h, "pooled": p} for h, p in zip(np.concatenate(hidden, axis=-1), pooled)]

    def rows(self, req: DiffusionRequest, encoded: list[Any], guided: bool) -> dict[str, np.ndarray]:
        hidden = np.stack([e["hidden"] for e in encoded])
        pooled = np.stack([e["pooled"] for e in encoded])
        if guided and self.force_zeros and not req.negative_prompt:
            hidden[0], pooled[0] = 0.0, 0.0
        time_ids = np.stack([self._time_ids(req, negative=guided and i == 0) for i in range(len(encoded))])
        n = req.num_images
        return {"encoder_hidden_states": np.repeat(hidden, n, axis=0), "text_embeds": np.repeat(pooled, n, axis=0),
                "time_ids": np.repeat(time_ids, n, axis=0)}

    def _time_ids(self, req: DiffusionRequest, negative: bool) -> np.ndarray:
        size = (req.height or self.native[0], req.width or self.native[1])
        original = req.extras.get("original_size", size)
        crops = req.extras.get("crops_coords_top_left", (0, 0))
        target = req.extras.get("target_size", size)
        if self.num_time_ids == 5:
            ids = [*original, *crops, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE]
        else:
            ids = [*original, *crops, *target]
        return np.asarray(ids, dtype=np.float32)


def pipeline(backend: InferenceBackend, spec: DiffusionSpec, encoders: list[TextEncoder],
             unet: UNetFacts) -> DiffusionPipeline:
    """The pipeline, with the LoRA adapters stored beside its U-Net (services.adapters)."""
    adapters = pipeline_adapters(backend, spec.name, backend.models()[spec.denoiser],
                                 (spec.denoiser, *(e.model for e in encoders)))
    built = DiffusionPipeline(backend, spec, SDXLConditioner(backend, spec, encoders, unet, adapters))
    built.adapters = adapters
    unet_spec = backend.models()[spec.denoiser]
    if ControlNets.accepts(unet_spec):  # a U-Net exported with ControlNet residual inputs
        built.control = ControlNets(backend, unet_spec, discover_controlnets(backend.models(), spec.name))
    return built


def pipelines(backend: InferenceBackend) -> dict[str, DiffusionPipeline]:
    return {name: pipeline(backend, spec, encoders, unet)
            for name, (spec, encoders, unet) in discover(backend.models()).items()}
