"""Export any diffusers AutoencoderKL folder into two Triton models.

The folder is either a bare AutoencoderKL folder (config.json with `_class_name`
"AutoencoderKL" + weights) or a pipeline folder whose `vae/` holds one (that VAE is
exported alone). The graphs are the same as the Stable Diffusion exporter's VAE graphs
(SD, SDXL and FLUX export theirs with export_vae_graphs below), so a pipeline can use either:

  <name>_vae_encoder   sample FP32 [B, C_img, H, W]  (H, W dynamic, multiples of size_multiple)
                       -> latent_parameters FP32 [B, 2*C_lat, H/f, W/f]
                       the posterior's mean and log-variance concatenated on channels
                       (`vae.encode(x).latent_dist.parameters`): the caller takes the mean,
                       or samples mean + exp(0.5 * logvar) * eps with the request's own
                       generator, so encoding stays reproducible per request.
  <name>_vae_decoder   latent_sample FP32 [B, C_lat, h, w] -> sample FP32 [B, C_img, h*f, w*f]
                       (images in about [-1, 1]; the caller clips)

Both graphs take latents in the VAE's own latent space: nothing multiplies by
scaling_factor (or subtracts shift_factor) inside them; a latent diffusion pipeline does
that itself with the parameters below. Images are [-1, 1], channels first.

Parameters in both configs (services.contract.VAEFacts; strings, as Triton stores them):
  genserve.pipeline          "vae"
  genserve.pipeline_name     NAME
  genserve.component         "vae_encoder" / "vae_decoder"
  genserve.vae_scale_factor  f = 2 ** (len(block_out_channels) - 1)
  genserve.size_multiple     f (image sides must be multiples of it)
  genserve.scaling_factor    config.scaling_factor, e.g. "0.18215"
  genserve.shift_factor      config.shift_factor, only when it is not null
  genserve.image_channels    C_img (config.in_channels = out_channels)
  genserve.latent_channels   C_lat (config.latent_channels)
  genserve.sample_size       native image side (config.sample_size, the first entry of a pair,
                             as AutoencoderKL's tiling reads it)
  genserve.sample_height, genserve.sample_width   both sides of config.sample_size
  genserve.force_upcast      "True" / "False" (config.force_upcast: the VAE wants fp32)

Each graph is traced at batch 2 and the native size and verified against PyTorch at sizes
chosen from its activation memory (export.verification): a small non-square size at batch 3,
so the dynamic batch and spatial axes are exercised before anything is written to the config,
and the largest of twice the native size or the native size that fits the machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from export.core import ComponentReport, ExportOptions, GraphExporter, load_fp32, sample_size_hw
from export.errors import UnsupportedFolder
from export.triton_config import TensorSpec
from export.verification import vae_activation
from services.contract import VAEFacts

ATOL = 1e-3  # fp32 VAE graphs on ONNX Runtime vs PyTorch; measured errors are ~1e-6
QUEUE_DELAY_US = 2000


class VAEDecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VAEEncoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.parameters


def vae_precision(config) -> str | None:
    """A VAE whose config asks for fp32 (`force_upcast`, diffusers' rule: SD's and SDXL's VAEs
    overflow in fp16 and diffusers upcasts them) stays fp32 whatever the export's dtype; one
    that does not (SDXL's fp16-fix VAE) follows it."""
    return "fp32" if getattr(config, "force_upcast", True) else None


def export_vae_graphs(export, vae, rng, latent_channels: int, image_channels: int, height: int, width: int,
                      scale: int, parameters: dict, extra: dict | None = None) -> None:
    """A latent pipeline's VAE decoder and encoder graphs (SD's, SDXL's, FLUX's: the same
    contract, each family's own `parameters`), traced at the native latent size. `export` is
    the family's GraphExporter (or a wrapper of it); `extra[role]`: more keyword arguments for
    that role's call (TensorRT plans)."""
    c, ic, extra = latent_channels, image_channels, extra or {}
    spatial = {0: "batch", 2: "height", 3: "width"}
    activation = vae_activation(vae.config, (height, width))  # grids in latent cells for both graphs
    precision = vae_precision(vae.config)
    export("vae_decoder", VAEDecoderGraph(vae),
           lambda b, grid: {"latent_sample": rng.standard_normal((b, c, *grid), dtype=np.float32)},
           [TensorSpec("latent_sample", "float32", (c, -1, -1))], [TensorSpec("sample", "float32", (ic, -1, -1))],
           {"latent_sample": spatial, "sample": spatial}, parameters, atol=1e-3, delay_us=2000,
           activation=activation, precision=precision, **extra.get("vae_decoder", {}))
    export("vae_encoder", VAEEncoderGraph(vae),
           lambda b, grid: {"sample": rng.uniform(-1, 1, (b, ic, grid[0] * scale, grid[1] * scale))
                            .astype(np.float32)},
           [TensorSpec("sample", "float32", (ic, -1, -1))],
           [TensorSpec("latent_parameters", "float32", (2 * c, -1, -1))],
           {"sample": spatial, "latent_parameters": spatial}, parameters, atol=1e-3, delay_us=2000,
           activation=activation, precision=precision, **extra.get("vae_encoder", {}))


def vae_folder(folder: Path) -> Path:
    """The folder holding the AutoencoderKL's config.json: `folder` itself or `folder/vae`."""
    folder = Path(folder)
    for candidate in (folder, folder / "vae"):
        config = candidate / "config.json"
        if config.exists():
            name = json.loads(config.read_text()).get("_class_name")
            if name == "AutoencoderKL":
                return candidate
            if candidate == folder and not (folder / "vae" / "config.json").exists():
                raise UnsupportedFolder(f"{config}: a {name!r}, not an AutoencoderKL")
    raise UnsupportedFolder(f"{folder}: no AutoencoderKL config.json here or in vae/")


def vae_facts(config) -> VAEFacts:
    """What both graphs' configs say of the VAE (services.contract)."""
    scale = 2 ** (len(config.block_out_channels) - 1)
    height, width = sample_size_hw(config.sample_size, "the VAE's config.json")
    return VAEFacts(vae_scale_factor=scale, size_multiple=scale, scaling_factor=config.scaling_factor,
                    shift_factor=getattr(config, "shift_factor", None), image_channels=config.in_channels,
                    latent_channels=config.latent_channels, native_height=height, native_width=width)


def export_vae(
    folder: Path,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    **shared,
) -> list[ComponentReport]:
    """Writes <name>_vae_encoder and <name>_vae_decoder into `repository`; one report each.
    `options`: the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    from diffusers import AutoencoderKL

    source, options = vae_folder(folder), ExportOptions.given(options, **shared)
    repository = Path(repository)
    options.progress(f"[{name}] loading {source}")
    vae = load_fp32(AutoencoderKL, source)
    config = vae.config
    if config.in_channels != config.out_channels:
        raise ValueError(f"{source}: in_channels {config.in_channels} != out_channels {config.out_channels}; "
                         "the VAE graphs assume one image channel count")
    facts = vae_facts(config)
    scale, c_img, c_lat = facts.vae_scale_factor, facts.image_channels, facts.latent_channels
    height, width = sample_size_hw(config.sample_size, "the VAE's config.json")  # as vae_facts reads it
    # force_upcast: a record of the folder's setting ("True"/"False"), not read by services
    params = facts.to_parameters() | {"genserve.force_upcast": str(bool(getattr(config, "force_upcast", True)))}
    if height % scale or width % scale:
        raise ValueError(f"{source}: sample_size {config.sample_size} is not a multiple of the VAE scale factor "
                         f"{scale}")
    h, w = height // scale, width // scale  # native latent size
    rng = np.random.default_rng(0)
    component = GraphExporter(repository, name, "vae", options)
    activation = vae_activation(config, (h, w))  # grids in latent cells for both graphs

    spatial = {0: "batch", 2: "height", 3: "width"}
    component(
        "vae_encoder", VAEEncoderGraph(vae),
        lambda b, grid: {"sample": rng.uniform(-1, 1, (b, c_img, grid[0] * scale, grid[1] * scale))
                         .astype(np.float32)},
        [TensorSpec("sample", "float32", (c_img, -1, -1))],
        [TensorSpec("latent_parameters", "float32", (2 * c_lat, -1, -1))],
        {"sample": spatial, "latent_parameters": spatial}, params, ATOL, QUEUE_DELAY_US, activation=activation,
        precision=vae_precision(config),
    )
    component(
        "vae_decoder", VAEDecoderGraph(vae),
        lambda b, grid: {"latent_sample": rng.standard_normal((b, c_lat, *grid), dtype=np.float32)},
        [TensorSpec("latent_sample", "float32", (c_lat, -1, -1))],
        [TensorSpec("sample", "float32", (c_img, -1, -1))],
        {"latent_sample": spatial, "sample": spatial}, params, ATOL, QUEUE_DELAY_US, activation=activation,
        precision=vae_precision(config),
    )
    return component.reports
