"""Export a Stable-Diffusion-format diffusers folder (SD 1.x/2.x layout) into Triton models.

One folder becomes four graphs (five with DeepCache's shallow U-Net), each verified against PyTorch, plus what the
torch-free pipeline needs beside them, as plain files Triton ignores:

  <name>_text_encoder   input_ids INT64 [B, L]            -> last_hidden_state FP32 [B, L, D]
                        + tokenizer.json (the `tokenizers` library loads it without torch)
  <name>_unet           sample FP32 [B, 4, h, w], timestep FP32 [B] (per sample),
                        encoder_hidden_states FP32 [B, L, D] -> noise_pred FP32 [B, 4, h, w]
                        (and deep_features FP32 [B, C_f, h, w], for DeepCache)
                        + scheduler_config.json
  <name>_unet_shallow   the U-Net's inputs + deep_features -> noise_pred: the shallowest level
                        alone over cached deep features (export.deepcache; `deepcache=False`
                        or a U-Net it cannot split leaves both out)
  <name>_vae_decoder    latent_sample FP32 [B, 4, h, w] -> sample FP32 [B, C, H, W] in [-1, 1]
  <name>_vae_encoder    sample FP32 [B, C, H, W] -> latent_parameters FP32 [B, 8, h, w]
                        (mean and log-variance: the pipeline samples from them with the
                        request's own generator, so img2img noise stays reproducible)

Height and width are dynamic (multiples of the VAE scale factor); the per-sample timestep
lets one U-Net call advance requests that are at different steps.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from export.controlnet import (
    format_layout,
    residual_inputs,
    residual_kwargs,
    residual_layout,
    residual_profiles,
)
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
from export.triton_config import TensorSpec
from export.vae import export_vae_graphs
from export.verification import ActivationModel, text_encoder_activation, unet_activation
from services.contract import TextEncoderFacts, UNetFacts, VAEFacts


class TextEncoderGraph(torch.nn.Module):
    """input_ids -> the last hidden states (SD's CLIP, FLUX's T5)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids=input_ids, return_dict=False)[0]


class _UNet(torch.nn.Module):
    """`residuals`: the ControlNet residual inputs' names (export.controlnet), down blocks' then
    the mid block's, taken after the text (positionally or by name)."""

    def __init__(self, unet, residuals: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.residuals = unet, tuple(residuals)

    def forward(self, sample, timestep, encoder_hidden_states, *residuals, **named):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False,
                         **residual_kwargs(self.residuals, residuals, named))[0]


def load_pipeline_components(folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return (load_fp32(CLIPTextModel, folder / "text_encoder"), load_fp32(UNet2DConditionModel, folder / "unet"),
            load_fp32(AutoencoderKL, folder / "vae"))


def fast_tokenizer_json(folder: Path, dest: Path, subfolder: str = "tokenizer") -> dict:
    """Writes tokenizer.json (the folder's, or converted from vocab.json/merges.txt) and
    returns the facts the pipeline needs (max length, pad/bos/eos ids)."""
    from transformers import CLIPTokenizer  # transformers 5: the tokenizers-backed one (CLIPTokenizerFast aliases it)

    tokenizer = CLIPTokenizer.from_pretrained(folder / subfolder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "tokenizer.json", dest / "tokenizer.json")
    return {
        "max_length": tokenizer.model_max_length,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def export_stable_diffusion(
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
    `deepcache`: also the shallow U-Net graph and the deep-features output (export.deepcache)
    that requests' `cache_interval` uses. `controlnet_inputs`: the U-Net takes ControlNet residuals
    (export.controlnet), so ControlNets can be added to the pipeline later."""
    folder, options = Path(folder), ExportOptions.given(options, **shared)
    max_batch_size = options.max_batch_size
    options.progress(f"[{name}] loading {folder}")
    text_encoder, unet, vae = load_pipeline_components(folder)

    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_c = unet.config.in_channels
    if latent_c != vae.config.latent_channels:
        inpainting = latent_c == 2 * vae.config.latent_channels + 1
        raise UnsupportedFolder(
            f"{folder}: the U-Net takes {latent_c} channels but the VAE's latents have {vae.config.latent_channels}"
            f"{' (an inpainting U-Net: latents, mask and masked-image latents)' if inpainting else ''}; served "
            f"U-Nets denoise the VAE's latents alone (inpainting here blends latents with a text-to-image U-Net)")
    image_c = vae.config.in_channels
    hidden = text_encoder.config.hidden_size
    rng = np.random.default_rng(0)
    export_graph = GraphExporter(repository, name, "stable_diffusion", options)

    def component(role, module, make_inputs, inputs, outputs, dynamic, parameters, atol, delay_us, files=(),
                  deep_channels=0, activation=ActivationModel(), precision=None):
        profile = None
        if options.tensorrt:  # a plan beside the graph; the VAE stays fp32 (see export.tensorrt)
            from export.tensorrt import stable_diffusion_profile

            profile = stable_diffusion_profile(
                role, max_rows=max_batch_size, seq_len=length, hidden=hidden, latent_channels=latent_c,
                image_channels=image_c, vae_scale=vae_scale, native_latent=(h, w),
                min_latent=size_multiple // vae_scale, max_latent=(2 * h, 2 * w), deep_channels=deep_channels)
            names = {t.name for t in inputs}  # a shallow graph may not take the text
            profile.update(residual_profiles(residuals, max_batch_size, size_multiple // vae_scale, (h, w),
                                             (2 * h, 2 * w)))
            profile = {k: v for k, v in profile.items() if k in names}
        return export_graph(role, module, make_inputs, inputs, outputs, dynamic, parameters, atol, delay_us,
                            files=files, tensorrt_profile=profile, activation=activation, precision=precision)

    h, w = sample_size_hw(unet.config.sample_size, f"{folder}/unet/config.json")  # native latent size
    residuals = residual_layout(unet) if controlnet_inputs else []
    size_multiple = vae_scale * 2 ** (len(unet.config.down_block_types) - 1)

    # 1. Text encoder (fixed sequence length: prompts are padded to the tokenizer's max).
    te_dir = repository / f"{name}_text_encoder"
    te_dir.mkdir(parents=True, exist_ok=True)
    tok = fast_tokenizer_json(folder, te_dir)
    length = tok["max_length"]
    vocab = text_encoder.config.vocab_size
    component(
        "text_encoder", TextEncoderGraph(text_encoder),
        lambda b, _: {"input_ids": rng.integers(0, vocab, (b, length)).astype(np.int64)},
        [TensorSpec("input_ids", "int64", (length,))],
        [TensorSpec("last_hidden_state", "float32", (length, hidden))],
        {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}},
        TextEncoderFacts(max_length=length, hidden_size=hidden, pad_token_id=tok["pad_token_id"],
                         bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"]).to_parameters(),
        atol=1e-4, delay_us=1000,
        activation=text_encoder_activation(text_encoder.config.num_attention_heads, length, hidden,
                                           text_encoder.config.intermediate_size),
    )

    # 2. U-Net with per-sample timesteps and dynamic spatial size; with DeepCache (export.deepcache)
    #    it also returns its deep features, and a shallow graph reuses them.
    def unet_inputs(b, grid):
        return {"sample": rng.standard_normal((b, latent_c, *grid), dtype=np.float32),
                "timestep": rng.uniform(0, 999, b).astype(np.float32),
                "encoder_hidden_states": rng.standard_normal((b, length, hidden), dtype=np.float32),
                **residual_inputs(residuals, rng, b, *grid)}

    spatial = {0: "batch", 2: "height", 3: "width"}
    unet_tensors = [TensorSpec("sample", "float32", (latent_c, -1, -1)),
                    TensorSpec("timestep", "float32", (1,), reshape=()),
                    TensorSpec("encoder_hidden_states", "float32", (length, hidden)),
                    *(TensorSpec(n, "float32", (c, -1, -1)) for n, c, _ in residuals)]
    unet_axes = {"sample": spatial, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
                 "noise_pred": spatial, **{n: spatial for n, _, _ in residuals}}
    noise_pred = TensorSpec("noise_pred", "float32", (latent_c, -1, -1))
    # Latent sides must survive every down block's halving: traced graphs bake in the
    # upsampling sizes, so odd intermediate sizes cannot be served.
    unet_params = UNetFacts(in_channels=latent_c, native_height=h * vae_scale, native_width=w * vae_scale,
                            vae_scale_factor=vae_scale, size_multiple=size_multiple,
                            controlnet_residuals=format_layout(residuals) if residuals else None)
    wrapper = _UNet(unet, tuple(n for n, _, _ in residuals))
    export_unet(component, wrapper, unet, unet_inputs, unet_tensors, noise_pred, unet_axes, unet_params,
                deepcache=deepcache, rng=rng, shallow_options=lambda c: {"deep_channels": c}, atol=1e-3,
                delay_us=DENOISER_QUEUE_DELAY_US,
                activation=unet_activation(unet.config, (h, w), size_multiple // vae_scale, length),
                files=[(folder / "scheduler" / "scheduler_config.json", "scheduler_config.json")])

    # 3. VAE decoder and encoder.
    vae_params = VAEFacts(vae_scale_factor=vae_scale, scaling_factor=vae.config.scaling_factor,
                          image_channels=image_c, latent_channels=latent_c).to_parameters()
    export_vae_graphs(component, vae, rng, latent_c, image_c, h, w, vae_scale, vae_params)
    return export_graph.reports
