"""A Pix2Pix-style translator demo: digit outlines ("sketches") -> digits.

    python -m zoo.translator.train      # -> zoo/checkpoints/pix2pix_edges2digits.safetensors (+ .json)
    python -m zoo.translator.evaluate   # the digit classifier on sketches vs translated sketches

The task is built from the scikit-learn digits (32x32, the demo data of every family
here): the input is the digit's edge map (Sobel magnitude, thresholded: a one-pixel-wide
outline, as edges2shoes builds its inputs with an edge detector), the target the digit.
The generator is a U-Net (zoo/translator/model.py:UnetGenerator), trained against a
PatchGAN discriminator with the Pix2Pix objective (adversarial + 100 x L1). It is served
like any translator users bring: `python -m export translator --module
zoo/translator/model.py:UnetGenerator ...` (what `python -m export demo` does).
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "pix2pix_edges2digits.safetensors"
