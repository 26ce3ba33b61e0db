"""A small convolutional VAE on the digits, saved as a diffusers `AutoencoderKL` folder.

Trained here on CPU (`python -m zoo.vae.train`) on the scikit-learn digits (1-channel
32x32 in [-1, 1]) and committed as zoo/checkpoints/vae_digits/ (config.json +
diffusion_pytorch_model.safetensors + training.json). Its latent space is 2x4x4 with a
KL weight strong enough that decoding z ~ N(0, I) draws digits, so the VAE is a
generator on its own (`/v1/vae/sample`) and latents interpolate between digits
(`/v1/vae/interpolate`), besides encoding and decoding. `python -m zoo.vae.evaluate`
prints its figures.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "vae_digits"


def load_vae(path: str | Path = CHECKPOINT):
    """The committed VAE as a diffusers AutoencoderKL (CPU, fp32, eval mode)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval()
