"""An ESRGAN (RRDBNet) x4 super-resolution demo, trained here on the photos bundled in
scikit-image and scikit-learn with bicubic x4 degradation.

    python -m zoo.super_resolution.train      # -> zoo/checkpoints/esrgan_x4_photos.safetensors (+ .json)
    python -m zoo.super_resolution.evaluate   # PSNR / SSIM per held-out photo vs bicubic

The network is spandrel's ESRGAN class (the original RRDBNet: "model.0.weight",
"model.1.sub.N.RDB1.conv1.0.weight", ... keys), so the committed state dict is recognised
by spandrel, and with it by chaiNNer and ComfyUI, exactly like an ESRGAN checkpoint from
the wild; `python -m export sr` exports it like any other.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
CHECKPOINT = CHECKPOINTS / "esrgan_x4_photos.safetensors"
METRICS = CHECKPOINTS / "esrgan_x4_photos.json"
SCALE = 4
