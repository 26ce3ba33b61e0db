"""PSNR and SSIM of the ESRGAN x4 demo against bicubic, per held-out photo.

    .venv/bin/python -m zoo.super_resolution.evaluate [--weights PATH]

Each held-out photo (cropped to a multiple of 4) is degraded with PIL's bicubic x1/4,
then brought back by bicubic x4 (the baseline) and by the model (through spandrel, as
any tool would load the file). PSNR is over the RGB channels of uint8 images with a
4-pixel border shaved (the usual SR convention); SSIM is scikit-image's, on RGB.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from zoo.super_resolution import CHECKPOINT, SCALE
from zoo.super_resolution.data import HELD_OUT, bicubic_down, bicubic_up, crop_to_multiple, load_photo


def psnr(a: np.ndarray, b: np.ndarray, shave: int = SCALE) -> float:
    h, w = a.shape[:2]
    a, b = (x[shave:h - shave, shave:w - shave].astype(np.float64) for x in (a, b))
    mse = np.mean((a - b) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf")


def ssim(a: np.ndarray, b: np.ndarray, shave: int = SCALE) -> float:
    from skimage.metrics import structural_similarity

    h, w = a.shape[:2]
    a, b = (x[shave:h - shave, shave:w - shave] for x in (a, b))
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def load_model(weights: Path = CHECKPOINT):
    """The checkpoint through spandrel, as chaiNNer or ComfyUI would load it."""
    from export.torchvision_compat import import_spandrel

    return import_spandrel().ModelLoader(device="cpu").load_from_file(weights)


@torch.no_grad()
def upscale(descriptor, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    y = descriptor(x)[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def evaluate(weights: Path = CHECKPOINT) -> dict:
    descriptor = load_model(weights)
    out = {}
    for name in HELD_OUT:
        hr = crop_to_multiple(load_photo(name), SCALE)
        lr = bicubic_down(hr, SCALE)
        base, sr = bicubic_up(lr, SCALE), upscale(descriptor, lr)
        out[name] = {"size": list(hr.shape[:2]), "psnr_bicubic": round(psnr(base, hr), 3),
                     "psnr_model": round(psnr(sr, hr), 3), "ssim_bicubic": round(ssim(base, hr), 4),
                     "ssim_model": round(ssim(sr, hr), 4)}
        out[name]["psnr_gain_db"] = round(out[name]["psnr_model"] - out[name]["psnr_bicubic"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=CHECKPOINT)
    args = p.parse_args(argv)
    print(json.dumps(evaluate(args.weights), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
