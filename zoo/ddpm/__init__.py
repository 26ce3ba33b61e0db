"""A tiny class-conditional pixel-space DDPM on the digits, in diffusers' DDPMPipeline format.

Trained here on CPU (`python -m zoo.ddpm.train`) on scikit-learn's digits upsampled to
32x32, 1 channel, values in [-1, 1] (zoo.data, as the GANs use), and saved as a diffusers
folder, zoo/checkpoints/ddpm_digits/:

    model_index.json                   _class_name "DDPMPipeline", unet + scheduler
    unet/config.json + diffusion_pytorch_model.safetensors
                                       UNet2DModel, num_class_embeds=10 (class_labels 0-9)
    scheduler/scheduler_config.json    DDPMScheduler (see SCHEDULER_CONFIG)
    training.json                      seed, steps, times, classifier figures

The model has no unconditional branch: sample it conditioned on the label directly (no
classifier-free guidance). diffusers' DDPMPipeline itself passes no class_labels, so
`sample()` below is the reference loop (any diffusers scheduler built from the folder's
config, `DDIMScheduler.from_config(...)` for the 20-step figures).
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "ddpm_digits"

# The noise schedule, for training and for every sampler built from the saved config.
# - squaredcos_cap_v2 (Nichol & Dhariwal's cosine schedule): on 32x32 images the linear
#   schedule destroys the signal by about t=600 and wastes the rest of the range; the
#   cosine one spends the steps evenly, and alpha_bar(999) ~ 0, so sampling from pure
#   noise matches what the model saw in training.
# - epsilon prediction; clip_sample: the data lie in [-1, 1], so clipping the predicted
#   x0 there is exact knowledge, not a hack, and keeps few-step DDIM from overshooting.
# - timestep_spacing "trailing": few-step samplers start at t=999 (pure noise) rather
#   than at 951 as "leading" would (Lin et al. 2024, "Common diffusion noise schedules
#   and sample steps are flawed").
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,  # unused by squaredcos_cap_v2; diffusers' defaults, for completeness
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}


def build_unet(block_out_channels=(32, 64, 64), layers_per_block: int = 1, num_classes: int = 10):
    """UNet2DModel 1x32x32 -> 1x32x32: three resolutions (32, 16, 8), self-attention only
    at 8x8 (cheap there, and it lets the model see the whole digit), class embedding added
    to the timestep embedding."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=16,
        norm_num_groups=8,
        num_class_embeds=num_classes,
    )


def load_unet(path: str | Path = CHECKPOINT):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(str(Path(path) / "unet"), local_files_only=True).eval()


def load_scheduler_config(path: str | Path = CHECKPOINT) -> dict:
    import json

    return json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text())


def sample(unet, labels, scheduler, steps: int = 20, seed: int = 0, eta: float = 0.0, batch: int = 100):
    """Class-conditional samples [N, C, H, W] in [-1, 1] (torch), one seeded torch
    Generator per chunk of `batch` (chunk i uses seed + i), so a result does not depend
    on what was sampled before. `scheduler` is a diffusers scheduler instance."""
    import inspect

    import torch

    labels = torch.as_tensor(labels, dtype=torch.long)
    c, size = unet.config.in_channels, unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    takes_eta = "eta" in inspect.signature(scheduler.step).parameters
    out = []
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            y = labels[i : i + batch]
            gen = torch.Generator().manual_seed(seed + i)
            x = torch.randn((len(y), c, h, w), generator=gen) * scheduler.init_noise_sigma
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                eps = unet(scheduler.scale_model_input(x, t), t, class_labels=y).sample
                kwargs = {"eta": eta} if takes_eta else {}
                x = scheduler.step(eps, t, x, generator=gen, **kwargs).prev_sample
            out.append(x.clamp(-1, 1))
    return torch.cat(out)
