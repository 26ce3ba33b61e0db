"""A tiny text-to-image latent diffusion model in Stable Diffusion 1.x's format.

Trained here on CPU on the scikit-learn digits (`python -m zoo.latent_diffusion.train`)
and saved as a standard diffusers folder, zoo/checkpoints/sd_digits/, that
`StableDiffusionPipeline.from_pretrained` loads as is. It exists so the serving
stack (tokenizer, text encoder, U-Net loop with classifier-free guidance, VAE
decode) can be exported and tested end to end on a model small enough to commit.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "sd_digits"


def load_pipeline(path: str | Path = CHECKPOINT):
    """The committed model as a diffusers StableDiffusionPipeline (CPU, fp32)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
