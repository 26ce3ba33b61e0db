"""Export a Stable-Diffusion-XL-format diffusers folder into Triton models.

The contract with the serving side (services/ reads exactly this):

Every config carries the parameters genserve.pipeline = "stable_diffusion_xl",
genserve.pipeline_name = NAME and genserve.component = the role below. Booleans are
written "1" / "0". B is the batch axis (dynamic, up to max_batch_size); h, w are dynamic.

  <NAME>_text_encoder    (CLIPTextModel; absent when the folder has none, see below)
  <NAME>_text_encoder_2  (CLIPTextModelWithProjection)
      input   input_ids      INT64 [B, L]
      output  hidden_states  FP32  [B, L, D]   the penultimate hidden layer, hidden_states[-2]
                                               (what StableDiffusionXLPipeline.encode_prompt
                                               uses with clip_skip None; no final layer norm)
      output  pooled         FP32  [B, P]      only for the encoder whose first output is 2-D
                                               (text_encoder_2's projected `text_embeds`)
      files   tokenizer.json (that folder's own tokenizer, `tokenizers` format)
      params  genserve.max_length (L), genserve.pad_token_id, genserve.bos_token_id,
              genserve.eos_token_id, genserve.hidden_size (D), genserve.pooled (1/0),
              genserve.pooled_dim (P, only where pooled is 1)
      Ids are what diffusers feeds: bos, tokens, eos, then padding to L with *that*
      tokenizer's pad token (padding="max_length"): SDXL's tokenizer pads with eos
      (49407), tokenizer_2 with "!" (0); pad_token_id says which. L is the same for both.
      Refiner-style folders (stable-diffusion-xl-refiner-1.0) have no text_encoder/tokenizer:
      then <NAME>_text_encoder is simply not exported, and the U-Net's encoder_hidden_states
      are text_encoder_2's alone.

  <NAME>_unet
      inputs  sample                 FP32 [B, C, h, w]
              timestep               FP32 dims [1], reshape [] (one per sample; the graph sees [B])
              encoder_hidden_states  FP32 [B, L, D1 + D2]  = concat(text_encoder.hidden_states,
                                     text_encoder_2.hidden_states, axis=-1), in that order
              text_embeds            FP32 [B, P]  = text_encoder_2's pooled
              time_ids               FP32 [B, N]  N = 6: original (h, w), crop top-left (y, x),
                                     target (h, w), in pixels; N = 5 (aesthetics models):
                                     original (h, w), crop (y, x), aesthetic score.
                                     N is derived from the weights: add_embedding.linear_1
                                     .in_features = P + N * addition_time_embed_dim.
              down_block_res_i,      ControlNet residuals (export.controlnet; zeros: no control),
              mid_block_res          with genserve.controlnet_residuals; not with
                                     controlnet_inputs=False (--no-controlnet-inputs)
      output  noise_pred             FP32 [B, C, h, w]
              deep_features          FP32 [B, C_f, h, w], for DeepCache (export.deepcache)
      files   scheduler_config.json (folder/scheduler's)

  <NAME>_unet_shallow (DeepCache; not with deepcache=False)
      inputs  sample, timestep, deep_features, text_embeds, time_ids (and encoder_hidden_states
              where the shallowest blocks have cross attention; SDXL's have none)
      output  noise_pred
      params  genserve.in_channels (C), genserve.sample_height, genserve.sample_width (native
              latent size, always written), genserve.sample_size (only when the native size is
              square: a reader that assumes squares fails loudly on a non-square model instead
              of guessing), genserve.vae_scale_factor, genserve.size_multiple (pixels: image
              sides must be multiples of it, as for SD), genserve.num_time_ids (N),
              genserve.text_embeds_dim (P), genserve.cross_attention_dim (D1 + D2),
              genserve.force_zeros_for_empty_prompt (model_index.json, default 1 as diffusers
              registers it: an empty negative prompt gets all-zero hidden states and pooled
              instead of encoding ""), genserve.requires_aesthetics_score (model_index.json,
              default 0)

  <NAME>_vae_decoder   latent_sample FP32 [B, C, h, w] -> sample FP32 [B, C_img, H, W] in [-1, 1]
  <NAME>_vae_encoder   sample FP32 [B, C_img, H, W] -> latent_parameters FP32 [B, 2C, h, w]
                       (mean and log-variance, as for SD)
      params  genserve.vae_scale_factor, genserve.scaling_factor, genserve.image_channels,
              genserve.latent_channels, genserve.force_upcast (1/0; graphs are always fp32, so
              this only records the folder's setting), genserve.shift_factor (only when the VAE
              config has a non-null one), genserve.latents_mean and genserve.latents_std (only
              when both are non-null; comma-separated floats, one per latent channel: diffusers'
              SDXL pipeline then decodes latents * std / scaling_factor + mean instead of
              latents / scaling_factor)

Every graph is traced at batch 2 and the native size and verified against PyTorch in
ONNX Runtime at batch 3 (and twice the native size for the U-Net and VAE), with dynamic
batch and spatial axes; configs come from export/triton_config.py (dynamic batching,
zero warm-up at the native size). TensorRT plans are not built for SDXL yet: asking for
them is refused with a message (GPU configs still get ONNX Runtime's TensorRT accelerator).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from export.controlnet import format_layout, residual_inputs, residual_kwargs, residual_layout
from export.core import (
    DENOISER_QUEUE_DELAY_US,
    ComponentReport,
    ExportOptions,
    GraphExporter,
    load_fp32,
    sample_size_hw,
)
from export.deepcache import export_unet
from export.errors import UnsupportedFolder
from export.stable_diffusion import fast_tokenizer_json
from export.triton_config import TensorSpec
from export.vae import export_vae_graphs
from export.verification import text_encoder_activation, unet_activation
from services.contract import FLAG, TextEncoderFacts, UNetFacts, VAEFacts

PIPELINE = "stable_diffusion_xl"


class _SDXLTextEncoder(torch.nn.Module):
    """input_ids -> penultimate hidden states (+ the first output when it is pooled, 2-D)."""

    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-2]
        return (hidden, out[0]) if self.pooled else hidden


class _SDXLUNet(torch.nn.Module):
    """`residuals`: the ControlNet residual inputs' names (export.controlnet), down blocks' then
    the mid block's, taken after the added conditioning (positionally or by name)."""

    def __init__(self, unet, residuals: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.residuals = unet, tuple(residuals)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals, **named):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                         **residual_kwargs(self.residuals, residuals, named))[0]


def _present(folder: Path, index: dict, component: str) -> bool:
    """A component is there when model_index.json names a class for it (or, without an
    entry, when its subfolder exists)."""
    if component in index:
        entry = index[component]
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
    return (folder / component).is_dir()


def export_stable_diffusion_xl(
    folder: Path,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    *,
    deepcache: bool = True,
    controlnet_inputs: bool = True,
    **shared,
) -> list[ComponentReport]:
    """`options`: the shared arguments (export.core.ExportOptions), or any of them as keywords.
    `deepcache`: also the shallow U-Net graph and the deep-features output (export.deepcache).
    `controlnet_inputs`: the U-Net takes ControlNet residuals (export.controlnet), so SDXL
    ControlNets can be added to the pipeline later."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder, repository, options = Path(folder), Path(repository), ExportOptions.given(options, **shared)
    if options.tensorrt:
        raise UnsupportedFolder(
            f"{folder}: TensorRT plans are not built for Stable Diffusion XL yet; export without --tensorrt "
            f"(with --target gpu, ONNX Runtime's TensorRT accelerator still runs the graphs)")
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").exists() else {}
    options.progress(f"[{name}] loading {folder}")

    encoders = []  # (role, tokenizer subfolder, model)
    if _present(folder, index, "text_encoder"):
        encoders.append(("text_encoder", "tokenizer", load_fp32(CLIPTextModel, folder / "text_encoder")))
    if not _present(folder, index, "text_encoder_2"):
        raise UnsupportedFolder(f"{folder}: no text_encoder_2; SDXL's pooled text embedding comes from it")
    encoders.append(("text_encoder_2", "tokenizer_2",
                     load_fp32(CLIPTextModelWithProjection, folder / "text_encoder_2")))
    unet = load_fp32(UNet2DConditionModel, folder / "unet")
    vae = load_fp32(AutoencoderKL, folder / "vae")
    if unet.config.addition_embed_type != "text_time":
        raise UnsupportedFolder(f"{folder}: the U-Net's addition_embed_type is "
                                f"{unet.config.addition_embed_type!r}, not SDXL's 'text_time'")

    rng = np.random.default_rng(0)
    export_graph = GraphExporter(repository, name, PIPELINE, options)

    # 1. Text encoders: fixed sequence length (prompts are padded to the tokenizer's max).
    lengths, hidden_sizes, pooled_dim = {}, [], None
    for role, tokenizer_dir, model in encoders:
        model_dir = export_graph.model_dir(role)
        model_dir.mkdir(parents=True, exist_ok=True)
        tok = fast_tokenizer_json(folder, model_dir, tokenizer_dir)
        length, hidden, vocab = tok["max_length"], model.config.hidden_size, model.config.vocab_size
        lengths[role] = length
        hidden_sizes.append(hidden)
        with torch.no_grad():
            first = model(input_ids=torch.zeros((1, length), dtype=torch.int64), return_dict=True)[0]
        pooled = first.ndim == 2
        if pooled and pooled_dim is None:  # diffusers takes the first 2-D output it meets
            pooled_dim = int(first.shape[-1])
        specials = [t for t in (tok["bos_token_id"], tok["eos_token_id"]) if t is not None]
        ordinary = np.setdiff1d(np.arange(vocab), specials)

        def make_ids(b, _k, length=length, tok=tok, ordinary=ordinary):
            # What a tokenizer produces: bos, words, eos, padding with this tokenizer's pad id
            # (the pooled output is read at the eos position).
            ids = np.full((b, length), tok["pad_token_id"], np.int64)
            for row in range(b):
                n = int(rng.integers(1, length - 1))
                ids[row, 0] = tok["bos_token_id"]
                ids[row, 1:n + 1] = rng.choice(ordinary, n)
                ids[row, n + 1] = tok["eos_token_id"]
            return ids

        outputs = [TensorSpec("hidden_states", "float32", (length, hidden))]
        dynamic = {"input_ids": {0: "batch"}, "hidden_states": {0: "batch"}}
        if pooled:
            outputs.append(TensorSpec("pooled", "float32", (int(first.shape[-1]),)))
            dynamic["pooled"] = {0: "batch"}
        params = TextEncoderFacts(max_length=length, hidden_size=hidden, pad_token_id=tok["pad_token_id"],
                                  bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"], pooled=pooled,
                                  pooled_dim=int(first.shape[-1]) if pooled else None).to_parameters()
        export_graph(
            role, _SDXLTextEncoder(model, pooled),
            lambda b, k, make_ids=make_ids: {"input_ids": make_ids(b, k)},
            [TensorSpec("input_ids", "int64", (length,))], outputs, dynamic, params, atol=1e-4, delay_us=1000,
            activation=text_encoder_activation(model.config.num_attention_heads, length, hidden,
                                               model.config.intermediate_size))

    if len(set(lengths.values())) != 1:
        raise UnsupportedFolder(f"{folder}: the tokenizers' max lengths differ ({lengths}); SDXL concatenates "
                                f"both encoders' hidden states position by position")
    if pooled_dim is None:
        raise UnsupportedFolder(f"{folder}: no text encoder has a pooled (2-D) first output "
                                f"for the U-Net's text_embeds")
    length, context = next(iter(lengths.values())), sum(hidden_sizes)
    if isinstance(unet.config.cross_attention_dim, int) and unet.config.cross_attention_dim != context:
        raise UnsupportedFolder(f"{folder}: the U-Net attends to {unet.config.cross_attention_dim} features but the "
                                f"text encoders give {' + '.join(map(str, hidden_sizes))} = {context}")

    # 2. U-Net with per-sample timesteps, the text_time conditioning and dynamic spatial size.
    time_in = unet.add_embedding.linear_1.in_features - pooled_dim
    per_id = unet.config.addition_time_embed_dim
    if time_in <= 0 or time_in % per_id:
        raise UnsupportedFolder(f"{folder}: add_embedding takes {unet.add_embedding.linear_1.in_features} features, "
                                f"which is not pooled {pooled_dim} + N x addition_time_embed_dim {per_id}")
    n_time_ids = time_in // per_id
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_c, image_c = unet.config.in_channels, vae.config.in_channels
    h, w = sample_size_hw(unet.config.sample_size, f"{folder}/unet/config.json")
    size_multiple = vae_scale * 2 ** (len(unet.config.down_block_types) - 1)
    spatial = {0: "batch", 2: "height", 3: "width"}
    residuals = residual_layout(unet, {"text_embeds": pooled_dim, "time_ids": n_time_ids}) if controlnet_inputs else []
    export_unet(
        export_graph, _SDXLUNet(unet, tuple(n for n, _, _ in residuals)), unet,
        lambda b, grid: {"sample": rng.standard_normal((b, latent_c, *grid), dtype=np.float32),
                      "timestep": rng.uniform(0, 999, (b,)).astype(np.float32),
                      "encoder_hidden_states": rng.standard_normal((b, length, context), dtype=np.float32),
                      "text_embeds": rng.standard_normal((b, pooled_dim), dtype=np.float32),
                      "time_ids": rng.uniform(0, 1024, (b, n_time_ids)).astype(np.float32),
                      **residual_inputs(residuals, rng, b, *grid)},
        [TensorSpec("sample", "float32", (latent_c, -1, -1)),
         TensorSpec("timestep", "float32", (1,), reshape=()),
         TensorSpec("encoder_hidden_states", "float32", (length, context)),
         TensorSpec("text_embeds", "float32", (pooled_dim,)),
         TensorSpec("time_ids", "float32", (n_time_ids,)),
         *(TensorSpec(n, "float32", (c, -1, -1)) for n, c, _ in residuals)],
        TensorSpec("noise_pred", "float32", (latent_c, -1, -1)),
        {"sample": spatial, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
         "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}, "noise_pred": spatial,
         **{n: spatial for n, _, _ in residuals}},
        UNetFacts(in_channels=latent_c, native_height=h * vae_scale, native_width=w * vae_scale,
                  vae_scale_factor=vae_scale, size_multiple=size_multiple, num_time_ids=n_time_ids,
                  text_embeds_dim=pooled_dim, cross_attention_dim=context,
                  force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
                  requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
                  controlnet_residuals=format_layout(residuals) if residuals else None),
        deepcache=deepcache, rng=rng, added=("text_embeds", "time_ids"), atol=1e-3, delay_us=DENOISER_QUEUE_DELAY_US,
        files=[(folder / "scheduler" / "scheduler_config.json", "scheduler_config.json")],
        activation=unet_activation(unet.config, (h, w), size_multiple // vae_scale, length),
    )

    # 3. VAE decoder and encoder (SD's graphs) with SDXL's extra latent facts.
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:  # the latent statistics come as a pair or not at all
        mean = std = None
    vae_params = VAEFacts(vae_scale_factor=vae_scale, scaling_factor=vae.config.scaling_factor,
                          image_channels=image_c, latent_channels=vae.config.latent_channels,
                          shift_factor=getattr(vae.config, "shift_factor", None),
                          latents_mean=tuple(mean) if mean is not None else None,
                          latents_std=tuple(std) if std is not None else None).to_parameters()
    # a record of the folder's setting (graphs are exported fp32 whatever it says), not read by services
    vae_params["genserve.force_upcast"] = FLAG.format(getattr(vae.config, "force_upcast", False))
    export_vae_graphs(export_graph, vae, rng, latent_c, image_c, h, w, vae_scale, vae_params)
    return export_graph.reports
