"""ControlNet for Stable Diffusion 1.x/2.x and SDXL pipelines: the U-Net's residual inputs and
the ControlNet graphs that feed them.

A ControlNet (Zhang et al., 2023) is a trainable copy of a U-Net's encoder that reads a
control image (edges, depth, pose, ...) and returns one residual per skip connection of the
U-Net's down path plus one for its mid block; the U-Net adds them where it reads them. So:

  <name>_unet                  `export sd` gives the U-Net those residuals as inputs,
                               down_block_res_0 .. down_block_res_{n-1} FP32 [B, C_i, h/f_i, w/f_i]
                               and mid_block_res FP32 [B, C_mid, h/f_mid, w/f_mid] (zeros: no
                               control; x + 0 is exact, so a row without control is the plain
                               U-Net), with genserve.controlnet_residuals = "C_i/f_i,..." so
                               the pipeline can size the zeros. `--no-controlnet-inputs`
                               leaves them out (such a pipeline takes no ControlNet).
  <name>_controlnet_<cn>       `export controlnet --pipeline <name> --name <cn>`:
                               sample, timestep, encoder_hidden_states, controlnet_cond FP32
                               [B, C_cond, H, W] in [0, 1] (and SDXL's text_embeds, time_ids,
                               as its U-Net takes them) -> the residuals above, unscaled
                               (conditioning scale 1, no guess mode: the pipeline scales per row).

A ControlNet can be added to a pipeline exported earlier: it is checked against the base
U-Net's inputs in the repository (channels, text width, residual layout).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from export.core import ExportOptions, GraphExporter, load_fp32
from export.errors import ControlNetExportError
from export.triton_config import TensorSpec
from export.verification import unet_activation
from services.contract import ControlNetFacts, UNetFacts
from services.pipelines.controlnet import MID_RESIDUAL, down_residual, parse_layout

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")


@torch.no_grad()
def residual_layout(unet, added: dict[str, int] | None = None) -> list[tuple[str, int, int]]:
    """(input name, channels, downsampling factor) of each residual a ControlNet gives this
    UNet2DConditionModel, in its forward's order, found by running it once at the smallest side
    every level can halve (hooks on conv_in, each down block and the mid block): the layout follows the U-Net's own
    blocks, whatever their number and layers. `added`: the added conditioning it takes (SDXL's
    text_embeds and time_ids: name -> features)."""
    size = 2 ** len(unet.down_blocks)
    shapes: list[torch.Size] = []
    mid: list[torch.Size] = []
    hooks = [unet.conv_in.register_forward_hook(lambda _m, _a, out: shapes.append(out.shape))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda _m, _a, out: shapes.extend(t.shape for t in out[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda _m, _a, out: mid.append(out.shape)))
    try:
        sample = torch.zeros(1, unet.config.in_channels, size, size)
        text = torch.zeros(1, 1, unet.config.cross_attention_dim)
        kwargs = {"added_cond_kwargs": {k: torch.zeros(1, n) for k, n in added.items()}} if added else {}
        unet(sample, torch.zeros(1), text, return_dict=False, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    named = [(down_residual(i), s) for i, s in enumerate(shapes)] + [(MID_RESIDUAL, mid[0])]
    return [(n, int(s[1]), size // int(s[2])) for n, s in named]


def residual_kwargs(names: tuple[str, ...], positional, named: dict) -> dict:
    """A U-Net wrapper's residual inputs (`names`, given positionally or by name) as diffusers'
    UNet2DConditionModel keywords: the down blocks' then the mid block's; {} without them."""
    if not names:
        return {}
    given = [{**named, **dict(zip(names, positional))}[n] for n in names]
    return {"down_block_additional_residuals": tuple(given[:-1]), "mid_block_additional_residual": given[-1]}


def takes_added_conditioning(controlnet) -> bool:
    """An SDXL ControlNet: it reads the U-Net's text_embeds and time_ids (`text_time`)."""
    return controlnet.config.addition_embed_type == "text_time"


def format_layout(layout: list[tuple[str, int, int]]) -> str:
    return ",".join(f"{c}/{f}" for _, c, f in layout)


def residual_inputs(layout, rng: np.random.Generator, batch: int, h: int, w: int) -> dict[str, np.ndarray]:
    """Random residuals for a U-Net export's trace and parity check (zeros would not show that
    the graph reads them)."""
    return {n: rng.standard_normal((batch, c, h // f, w // f), dtype=np.float32) for n, c, f in layout}


def residual_profiles(layout, max_rows: int, min_latent: int, native_latent: tuple[int, int],
                      max_latent: tuple[int, int]) -> dict:
    """TensorRT shape ranges of the residual inputs, following the latent's (export.tensorrt)."""
    from export.tensorrt import ShapeRange

    (nh, nw), (mh, mw) = native_latent, max_latent
    return {n: ShapeRange((1, c, max(1, min_latent // f), max(1, min_latent // f)),
                          (2, c, nh // f, nw // f),
                          (max_rows, c, mh // f, mw // f)) for n, c, f in layout}


class ControlNetGraph(torch.nn.Module):
    """A diffusers ControlNetModel as an export module: the residuals at conditioning scale 1
    without guess mode (the pipeline applies both per row), one output per residual. An SDXL
    ControlNet also takes the U-Net's added conditioning, text_embeds and time_ids."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, text_embeds=None, time_ids=None):
        added = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}} \
            if text_embeds is not None else {}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=1.0, guess_mode=False, return_dict=False, **added)
        return (*down, mid)


# The U-Net inputs an SDXL ControlNet reads besides the text (the U-Net's added conditioning).
ADDED_INPUTS = ("text_embeds", "time_ids")
BASE_PIPELINES = ("stable_diffusion", "stable_diffusion_xl")


def _base_unet(repository: Path, pipeline: str):
    from services.runtime.repository import ModelRepository

    models = ModelRepository(repository).models
    unet = models.get(f"{pipeline}_unet")
    if unet is None or unet.parameters.get("genserve.pipeline") not in BASE_PIPELINES:
        found = sorted(m.parameters["genserve.pipeline_name"] for m in models.values()
                       if m.parameters.get("genserve.pipeline") in BASE_PIPELINES
                       and m.parameters.get("genserve.component") == "unet")
        raise ControlNetExportError(f"no Stable Diffusion (1.x/2.x or XL) pipeline {pipeline!r} in {repository} "
                                    f"(found: {', '.join(found) or 'none'})")
    if UNetFacts.from_spec(unet).controlnet_residuals is None:
        raise ControlNetExportError(f"pipeline {pipeline!r}: its U-Net was exported without ControlNet inputs "
                                    f"(--no-controlnet-inputs, or before they existed); export the pipeline again")
    return unet


def check_fits(controlnet, layout, unet_spec) -> None:
    """The ControlNet's residuals, latent channels and text width must be the base U-Net's."""
    facts = UNetFacts.from_spec(unet_spec)
    if facts.controlnet_residuals is None:  # _base_unet refuses such a U-Net first
        raise ControlNetExportError(f"{unet_spec.name}: exported without ControlNet inputs")
    base = parse_layout(facts.controlnet_residuals)
    if [(c, f) for _, c, f in layout] != [(c, f) for _, c, f in base]:
        raise ControlNetExportError(
            f"the ControlNet's residuals ({format_layout(layout)}, channels/downsampling) are not those "
            f"{unet_spec.name} takes ({format_layout(base)}): it was made for another base model")
    sample, text = unet_spec.input("sample"), unet_spec.input("encoder_hidden_states")
    vae_scale, own = facts.vae_scale_factor, conditioning_downsampling(controlnet)
    if own != vae_scale:
        raise ControlNetExportError(f"the ControlNet reads its control image at {own} pixels per latent, "
                                    f"the pipeline's VAE at {vae_scale}")
    if controlnet.config.in_channels != sample.dims[0]:
        raise ControlNetExportError(f"the ControlNet takes {controlnet.config.in_channels} latent channels, "
                                    f"{unet_spec.name} {sample.dims[0]}")
    if controlnet.config.cross_attention_dim != text.dims[-1]:
        raise ControlNetExportError(f"the ControlNet reads text of width {controlnet.config.cross_attention_dim}, "
                                    f"{unet_spec.name}'s text encoder gives {text.dims[-1]}")
    takes_added = takes_added_conditioning(controlnet)
    base_added = all(n in {t.name for t in unet_spec.inputs} for n in ADDED_INPUTS)
    if takes_added != base_added:
        raise ControlNetExportError(
            f"the ControlNet is for {'an SDXL' if takes_added else 'an SD 1.x/2.x'} U-Net, {unet_spec.name} is "
            f"{'an SDXL' if base_added else 'an SD 1.x/2.x'} one")
    if takes_added:
        pooled, time_ids = (unet_spec.input(n).dims[0] for n in ADDED_INPUTS)
        wants = controlnet.config.projection_class_embeddings_input_dim
        made = pooled + time_ids * controlnet.config.addition_time_embed_dim
        if wants != made:
            raise ControlNetExportError(
                f"the ControlNet's added conditioning takes {wants} features, {unet_spec.name}'s text_embeds "
                f"({pooled}) and {time_ids} time ids make {made}")


def export_controlnet(folder: Path, repository: Path, pipeline: str, name: str | None = None,
                      options: ExportOptions | None = None, **shared):
    """`folder` (a diffusers ControlNetModel) -> `<pipeline>_controlnet_<name>`, verified against
    PyTorch; returns its ComponentReport. `options`: the shared arguments (export.core.ExportOptions),
    or any of them as keywords."""
    from diffusers import ControlNetModel

    folder, repository, options = Path(folder), Path(repository), ExportOptions.given(options, **shared)
    name = name or folder.name.lower().replace("-", "_")
    if not NAME_PATTERN.match(name):
        raise ControlNetExportError(f"--name {name!r}: use lower-case letters, digits and underscores "
                                    f"(at most 64, starting with a letter or digit)")
    unet_spec = _base_unet(repository, pipeline)
    options.progress(f"[{pipeline}] loading ControlNet {folder}")
    controlnet = load_fp32(ControlNetModel, folder)
    layout = residual_layout_of_controlnet(controlnet)
    check_fits(controlnet, layout, unet_spec)
    unet = UNetFacts.from_spec(unet_spec)
    latent_c, (length, hidden) = unet_spec.input("sample").dims[0], unet_spec.input("encoder_hidden_states").dims
    scale = unet.vae_scale_factor or 1  # None: a pixel-space U-Net (UNetFacts reads it so too)
    h, w = unet.native_height // scale, unet.native_width // scale  # native latent size
    cond_c = controlnet.config.conditioning_channels
    added = [(n, unet_spec.input(n).dims[0]) for n in ADDED_INPUTS if takes_added_conditioning(controlnet)]
    rng = np.random.default_rng(0)

    def make_inputs(b, grid):
        return {"sample": rng.standard_normal((b, latent_c, *grid), dtype=np.float32),
                "timestep": rng.uniform(0, 999, b).astype(np.float32),
                "encoder_hidden_states": rng.standard_normal((b, length, hidden), dtype=np.float32),
                "controlnet_cond": rng.uniform(0, 1, (b, cond_c, grid[0] * scale, grid[1] * scale))
                .astype(np.float32),
                **{n: rng.uniform(0, 1024, (b, d)).astype(np.float32) if n == "time_ids"
                   else rng.standard_normal((b, d), dtype=np.float32) for n, d in added}}

    spatial = {0: "batch", 2: "height", 3: "width"}
    inputs = [TensorSpec("sample", "float32", (latent_c, -1, -1)),
              TensorSpec("timestep", "float32", (1,), reshape=()),
              TensorSpec("encoder_hidden_states", "float32", (length, hidden)),
              TensorSpec("controlnet_cond", "float32", (cond_c, -1, -1)),
              *(TensorSpec(n, "float32", (d,)) for n, d in added)]
    outputs = [TensorSpec(n, "float32", (c, -1, -1)) for n, c, _ in layout]
    axes = {"sample": spatial, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
            "controlnet_cond": spatial, **{n: {0: "batch"} for n, _ in added}, **{n: spatial for n, _, _ in layout}}
    export = GraphExporter(repository, pipeline, unet_spec.parameters["genserve.pipeline"], options)
    export(f"controlnet_{name}", ControlNetGraph(controlnet), make_inputs, inputs, outputs, axes,
           ControlNetFacts(name=name, conditioning_channels=cond_c, vae_scale_factor=scale,
                           global_pool_conditions=bool(controlnet.config.global_pool_conditions),
                           controlnet_residuals=format_layout(layout)).to_parameters(),
           atol=1e-3, delay_us=0,
           # the U-Net's encoder half: its attention and feature maps bound the checks' memory
           activation=unet_activation(controlnet.config, (h, w), unet.size_multiple // scale,
                                      length))
    return export.reports[-1]


def conditioning_downsampling(controlnet) -> int:
    """Control-image pixels per latent side: the conditioning embedding's stride-2 convolutions
    (one fewer than its channel stages), which must equal the base pipeline's VAE factor."""
    return 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)


@torch.no_grad()
def residual_layout_of_controlnet(controlnet) -> list[tuple[str, int, int]]:
    """The ControlNet's residuals as residual_layout gives a U-Net's, from one call."""
    size = 2 ** (len(controlnet.config.down_block_types) + 1)  # deep enough for every level
    scale = conditioning_downsampling(controlnet)
    sample = torch.zeros(1, controlnet.config.in_channels, size, size)
    cond = torch.zeros(1, controlnet.config.conditioning_channels, size * scale, size * scale)
    text = torch.zeros(1, 1, controlnet.config.cross_attention_dim)
    kwargs = {}
    if takes_added_conditioning(controlnet):  # any split of the added features will do
        pooled = controlnet.config.projection_class_embeddings_input_dim - controlnet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"time_ids": torch.zeros(1, 1), "text_embeds": torch.zeros(1, pooled)}
    down, mid = controlnet(sample, torch.zeros(1), text, cond, return_dict=False, **kwargs)
    named = [(down_residual(i), t.shape) for i, t in enumerate(down)] + [(MID_RESIDUAL, mid.shape)]
    return [(n, int(s[1]), size // int(s[2])) for n, s in named]
