"""The FLUX family (FluxPipeline: FLUX.1-dev, -schnell and their kin): a rectified-flow
transformer over 2x2-packed latents, conditioned on T5 hidden states and CLIP's pooled output;
the rest is the generic pipeline (services.pipelines.diffusion).

As diffusers' FluxPipeline:
  - texts: CLIP sees the first tokens of the prompt (truncated, as diffusers does; its
    pooled output is the transformer's pooled_projections), T5 the whole prompt padded to
    max_sequence_length (its hidden states are encoder_hidden_states; a longer prompt is
    refused, never cut);
  - latents: the documented unpacked noise (C, H/f, W/f) per image; packed into (h/2 * w/2)
    patches of 4C features only at the transformer's door, with (0, row, column) img_ids;
  - schedule: sigmas linspace(1, 1/n, n) shifted by mu, linear in the image's patch count
    (calculate_shift with the scheduler config's base/max sequence lengths and shifts);
  - timestep input = t / 1000; guidance-distilled models (guidance_embeds) take
    guidance_scale as an input, one row per image; the others run true classifier-free
    guidance with the negative prompt (diffusers' true_cfg_scale) when guidance_scale > 1;
  - decode: latents / scaling_factor + shift_factor.
Graphs and parameters: export/flux.py.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from services.adapter_library import pipeline_adapters
from services.adapters import PipelineAdapters
from services.contract import TextEncoderFacts, TransformerFacts, VAEFacts
from services.pipelines.diffusion import DiffusionPipeline, DiffusionRequest, DiffusionSpec, PromptTokenizer
from services.runtime import InferenceBackend, ModelSpec
from services.schedulers import is_flow_matching
from services.schedulers.scheduling_flow_match_euler_discrete import calculate_shift

FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default (guidance-distilled models)


def pack(latents: np.ndarray) -> np.ndarray:
    """[R, C, h, w] -> [R, h/2 * w/2, 4C]: 2x2 patches, channels first within a patch."""
    r, c, h, w = latents.shape
    x = latents.reshape(r, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(r, (h // 2) * (w // 2), c * 4))


def unpack(packed: np.ndarray, latent_shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of pack, for a latent of (C, h, w)."""
    c, h, w = latent_shape
    x = packed.reshape(len(packed), h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x.reshape(len(packed), c, h, w))


def image_ids(rows: int, patches_h: int, patches_w: int) -> np.ndarray:
    """[rows, h*w, 3]: (0, i, j) per patch (FluxPipeline._prepare_latent_image_ids)."""
    ids = np.zeros((patches_h, patches_w, 3), np.float32)
    ids[..., 1] = np.arange(patches_h, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(patches_w, dtype=np.float32)[None, :]
    return np.broadcast_to(ids.reshape(1, -1, 3), (rows, patches_h * patches_w, 3)).copy()


class FluxDenoiser:
    """FluxTransformer2DModel's side of the loop: packing, sigma timesteps, FluxPipeline's schedule."""

    def set_timesteps(self, scheduler, num_inference_steps: int, latent_shape: tuple[int, ...]) -> None:
        c, n = scheduler.config, num_inference_steps
        mu = calculate_shift((latent_shape[1] // 2) * (latent_shape[2] // 2), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)

    def inputs(self, sample: np.ndarray, timestep) -> dict[str, np.ndarray]:
        t = np.float32(timestep) / np.float32(1000)
        return {"hidden_states": pack(sample), "timestep": np.full((len(sample), 1), t, dtype=np.float32)}

    def prediction(self, output: np.ndarray, latent_shape: tuple[int, ...]) -> np.ndarray:
        return unpack(output, latent_shape)


class FluxConditioner:
    """CLIP pooled + T5 hidden states; the cache key is both tokenizers' ids end to end, then
    the request's adapters acting on either encoder (PipelineAdapters.text_key)."""

    def __init__(self, backend: InferenceBackend, spec: DiffusionSpec, clip: ModelSpec, t5: ModelSpec,
                 guidance_embeds: bool, adapters: PipelineAdapters):
        self.backend, self.spec, self.guidance_embeds = backend, spec, guidance_embeds
        self.adapters = adapters
        self.clip, self.t5 = clip.name, t5.name
        cp, tp = TextEncoderFacts.from_spec(clip), TextEncoderFacts.from_spec(t5)
        self.clip_tokenizer = PromptTokenizer(clip.file("tokenizer.json"), cp.max_length, cp.pad_token_id,
                                              truncate=True)
        self.t5_tokenizer = PromptTokenizer(t5.file("tokenizer.json"), tp.max_length, tp.pad_token_id)
        self.max_tokens = self.t5_tokenizer.max_length  # the prompt limit requests see
        self.empty_key = self._key("", "prompt")

    def _key(self, text: str, field_name: str) -> np.ndarray:
        return np.concatenate([self.clip_tokenizer(text, field_name), self.t5_tokenizer(text, field_name)])

    def tokenize(self, req: DiffusionRequest) -> list[np.ndarray]:
        keys = [self._key(req.prompt, "prompt")]
        if self.spec.classifier_free(req):
            keys.insert(0, self._key(req.negative_prompt, "negative_prompt"))
        if req.lora:
            keys = [self.adapters.text_key(k, req.lora, req.adapter_loads, (self.clip, self.t5)) for k in keys]
        return keys

    async def encode(self, keys: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        split = self.clip_tokenizer.max_length
        ids, scales = self.adapters.text_rows(keys, split + self.t5_tokenizer.max_length)
        clip = self.adapters.call_inputs(self.clip, {"input_ids": ids[:, :split], **scales})
        t5 = self.adapters.call_inputs(self.t5, {"input_ids": ids[:, split:], **scales})
        pooled = (await self.backend.infer(self.clip, clip))["pooled"]
        hidden = (await self.backend.infer(self.t5, t5))["hidden_states"]
        return [{"pooled": p, "hidden": h} for p, h in zip(pooled, hidden)]

    def rows(self, req: DiffusionRequest, encoded: list[Any], guided: bool) -> dict[str, np.ndarray]:
        n, spec = req.num_images, self.spec
        hidden = np.repeat(np.stack([e["hidden"] for e in encoded]), n, axis=0)
        rows = len(hidden)
        f = 2 * spec.vae_scale_factor  # pixels per patch side
        height, width = req.height or spec.native_height, req.width or spec.native_width
        cond = {"encoder_hidden_states": hidden,
                "pooled_projections": np.repeat(np.stack([e["pooled"] for e in encoded]), n, axis=0),
                "txt_ids": np.zeros((rows, hidden.shape[1], 3), np.float32),
                "img_ids": image_ids(rows, height // f, width // f)}
        if self.guidance_embeds:
            cond["guidance"] = np.full((rows, 1), req.guidance_scale, dtype=np.float32)
        return cond


def discover(models: dict[str, ModelSpec]) -> dict[str, dict[str, ModelSpec]]:
    groups: dict[str, dict[str, ModelSpec]] = {}
    for spec in models.values():
        p = spec.parameters
        if p.get("genserve.pipeline") == "flux":
            groups.setdefault(p["genserve.pipeline_name"], {})[p["genserve.component"]] = spec
    for name, parts in groups.items():
        missing = {"text_encoder", "text_encoder_2", "transformer", "vae_decoder"} - set(parts)
        if missing:
            raise ValueError(f"FLUX pipeline {name!r} lacks {sorted(missing)} in the repository")
    return dict(sorted(groups.items()))


def build(backend: InferenceBackend, name: str, parts: dict[str, ModelSpec]) -> DiffusionPipeline:
    transformer, dec = parts["transformer"], parts["vae_decoder"]
    t, d = TransformerFacts.from_spec(transformer), VAEFacts.from_spec(dec)
    guidance_embeds = t.guidance_embeds
    scheduler_config = json.loads(transformer.file("scheduler_config.json").read_text())
    if not is_flow_matching(scheduler_config):
        raise ValueError(f"FLUX pipeline {name!r}: its scheduler config is not a flow-matching one")
    spec = DiffusionSpec(
        name=name, family="flux", denoiser=transformer.name, scheduler_config=scheduler_config,
        latent_channels=d.latent_channels, image_channels=d.image_channels,
        vae_scale_factor=d.vae_scale_factor, native_height=t.native_height,
        native_width=t.native_width, size_multiple=t.size_multiple,
        vae_decoder=dec.name, vae_encoder=parts["vae_encoder"].name if "vae_encoder" in parts else None,
        scaling_factor=d.scaling_factor, shift_factor=d.shift_factor or 0.0,
        components=tuple(p.name for _, p in sorted(parts.items())),
        guidance="embedded" if guidance_embeds else "classifier_free",
        default_guidance_scale=FLUX_DEFAULT_GUIDANCE if guidance_embeds else 1.0,
        strength_rounding="start")
    adapters = pipeline_adapters(backend, name, transformer,
                                 (transformer.name, parts["text_encoder"].name, parts["text_encoder_2"].name))
    conditioner = FluxConditioner(backend, spec, parts["text_encoder"], parts["text_encoder_2"], guidance_embeds,
                                  adapters)
    pipeline = DiffusionPipeline(backend, spec, conditioner, FluxDenoiser())
    pipeline.adapters = adapters  # LoRA adapters stored beside the transformer (services.adapters)
    return pipeline


def pipelines(backend: InferenceBackend) -> dict[str, DiffusionPipeline]:
    return {name: build(backend, name, parts) for name, parts in discover(backend.models()).items()}
