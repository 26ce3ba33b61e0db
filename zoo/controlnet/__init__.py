"""A small ControlNet for the digits latent diffusion model (zoo/checkpoints/sd_digits): a digit's
outline (the edges2digits task's sketch, zoo/translator/data.py) steers the model to draw that
digit, with no word of the prompt naming it.

    python -m zoo.controlnet.train      # -> zoo/checkpoints/controlnet_digits_outline/ (a ControlNetModel folder)

`python -m export demo` exports it as sd_digits_controlnet_outline; the tests judge it with the
digit classifier (zoo/classifier.py): how often the drawn digit is the outline's, with and without
the control image.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "controlnet_digits_outline"


def control_images(sketches):
    """edges2digits sketches [N, 1, 32, 32] in [-1, 1] -> control images [N, 3, 32, 32] in [0, 1]
    (RGB, as diffusers' control image processor makes every image)."""
    return ((sketches + 1) / 2).repeat(1, 3, 1, 1)
