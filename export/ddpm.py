"""Export a pixel-space diffusion U-Net (diffusers UNet2DModel) into one Triton model.

Accepted folders (export.diffusers_folder dispatches both here):

  * a DDPMPipeline / DDIMPipeline folder: `unet/` (UNet2DModel) + `scheduler/scheduler_config.json`
  * a bare UNet2DModel folder: `config.json` + weights, with `scheduler_config.json` beside them
    (or in a `scheduler/` subfolder)

Class-conditional (`num_class_embeds`) or not, any channel count, `sample_size` an int or
(height, width). A folder without a scheduler config, or whose class embedding is not a
label lookup (`class_embed_type` "timestep"/"identity" take float vectors), is refused.

Graph contract (what services/ relies on):

  model `<name>_unet`, max_batch_size as asked (default 16), dynamic batching

  inputs   sample        FP32  dims [C, -1, -1]               -> graph [B, C, H, W]
           timestep      FP32  dims [1], reshape []           -> graph [B]   (per sample: one
                                                                 call may advance requests at
                                                                 different steps)
           class_labels  INT64 dims [1], reshape []           -> graph [B]   (0 .. num_classes-1;
                                                                 only when num_classes > 0)
  output   noise_pred    FP32  dims [C_out, -1, -1]           -> graph [B, C_out, H, W]
           the raw model output, whatever the scheduler's prediction_type says it is
           (epsilon, v_prediction or sample; with a learned-variance scheduler C_out = 2 C
           and the second half is the variance channel block).

  H and W are dynamic; each must be a multiple of genserve.size_multiple (every down
  block but the last halves the sides, and the up path must meet the same sizes).

  config.pbtxt parameters (strings):
    genserve.pipeline        "ddpm"
    genserve.pipeline_name   NAME
    genserve.component       "unet"
    genserve.in_channels     C
    genserve.out_channels    C_out
    genserve.sample_height   native height the model was trained at (always present)
    genserve.sample_width    native width (always present)
    genserve.sample_size     the side, only when the native size is square
    genserve.size_multiple   2 ** (number of down blocks - 1)
    genserve.num_classes     number of class labels, 0 if unconditional
    genserve.output_range    "-1,1" (the range of the final, denoised sample)

  beside config.pbtxt: scheduler_config.json, the folder's diffusers scheduler config
  (noise schedule, prediction_type, clip_sample, timestep_spacing, ...).

The graph is traced at batch 2 and the native size and verified against PyTorch at
batch 3 and twice the native size, with three different per-sample timesteps (and
class labels), before the config is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from export.core import (
    DENOISER_QUEUE_DELAY_US,
    ComponentReport,
    ExportOptions,
    GraphExporter,
    load_fp32,
    sample_size_hw,
)
from export.errors import UnsupportedFolder
from export.triton_config import TensorSpec
from export.verification import unet_activation
from services.contract import UNetFacts

OUTPUT_RANGE = (-1.0, 1.0)


class _UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep, return_dict=False)[0]


class _ClassUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, class_labels):
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]


def locate(folder: Path) -> tuple[Path, Path]:
    """(the UNet2DModel folder, the scheduler_config.json) of a pipeline or bare U-Net folder."""
    folder = Path(folder)
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").exists() else folder
    config = unet_dir / "config.json"
    if not config.exists():
        raise UnsupportedFolder(f"{folder}: no unet/config.json or config.json: not a UNet2DModel folder")
    kind = json.loads(config.read_text()).get("_class_name")
    if kind != "UNet2DModel":
        raise UnsupportedFolder(f"{config}: a {kind!r}, not a UNet2DModel (the ddpm family's U-Net)")
    candidates = [folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"]
    if unet_dir == folder:
        candidates.append(folder.parent / "scheduler" / "scheduler_config.json")
    for path in candidates:
        if path.exists():
            return unet_dir, path
    raise UnsupportedFolder(f"{folder}: no scheduler config (looked for "
                            f"{', '.join(str(p) for p in candidates)}); the serving loop needs the noise schedule")


def load_unet(unet_dir: Path):
    from diffusers import UNet2DModel

    return load_fp32(UNet2DModel, unet_dir)


def export_ddpm(
    folder: Path,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    **shared,
) -> list[ComponentReport]:
    """`options`: the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    folder, repository, options = Path(folder), Path(repository), ExportOptions.given(options, **shared)
    unet_dir, scheduler_config = locate(folder)
    progress = options.progress
    progress(f"[{name}] loading {unet_dir}")
    unet = load_unet(unet_dir)
    cfg = unet.config
    if cfg.class_embed_type is not None:
        raise UnsupportedFolder(f"{unet_dir}: class_embed_type={cfg.class_embed_type!r} takes float class vectors; "
                                f"only label lookups (num_class_embeds) are served")
    num_classes = int(cfg.num_class_embeds or 0) if unet.class_embedding is not None else 0
    c_in, c_out = int(cfg.in_channels), int(cfg.out_channels)
    h, w = sample_size_hw(cfg.sample_size, f"{unet_dir}/config.json")
    size_multiple = 2 ** (len(cfg.down_block_types) - 1)
    train_steps = int(json.loads(scheduler_config.read_text()).get("num_train_timesteps", 1000))
    rng = np.random.default_rng(0)

    def make_inputs(batch: int, grid: tuple[int, int]) -> dict[str, np.ndarray]:
        inputs = {
            "sample": rng.standard_normal((batch, c_in, *grid), dtype=np.float32),
            # distinct per-sample timesteps spread over the whole schedule
            "timestep": rng.permutation(np.linspace(0, train_steps - 1, batch)).astype(np.float32),
        }
        if num_classes:
            inputs["class_labels"] = rng.integers(0, num_classes, batch).astype(np.int64)
        return inputs

    module = _ClassUNet(unet) if num_classes else _UNet(unet)
    inputs = [TensorSpec("sample", "float32", (c_in, -1, -1)), TensorSpec("timestep", "float32", (1,), reshape=())]
    dynamic = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
               "noise_pred": {0: "batch", 2: "height", 3: "width"}}
    if num_classes:
        inputs.append(TensorSpec("class_labels", "int64", (1,), reshape=()))
        dynamic["class_labels"] = {0: "batch"}
    outputs = [TensorSpec("noise_pred", "float32", (c_out, -1, -1))]

    progress(f"[{name}] unet: {f'{num_classes} classes' if num_classes else 'unconditional'}, "
             f"{c_in}->{c_out} channels, {h}x{w}")
    parameters = UNetFacts(in_channels=c_in, out_channels=c_out, native_height=h, native_width=w,
                           size_multiple=size_multiple, num_classes=num_classes,
                           output_range=OUTPUT_RANGE).to_parameters()
    export_graph = GraphExporter(repository, name, "ddpm", options)
    export_graph("unet", module, make_inputs, inputs, outputs, dynamic, parameters, atol=1e-3,
                 delay_us=DENOISER_QUEUE_DELAY_US, activation=unet_activation(cfg, (h, w), size_multiple),
                 files=[(scheduler_config, "scheduler_config.json")])
    return export_graph.reports
