"""Single-file conversion at real size: an SD checkpoint of a shipped architecture's full size
(random weights in fp16, written in the LDM layout as hubs publish it) goes through
`export sd --checkpoint`'s conversion with no --config: detection, the shipped configuration,
diffusers' single-file loader, the CLIP vocabulary from open_clip. Checks that every converted
tensor equals its source and records file size, time and the process's peak memory.

  nice .venv/bin/python bench/bench_single_file.py --config sd15

The export of a real-size U-Net itself (minutes of ONNX tracing, tens of GB) is not run here.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import export.torchvision_compat  # noqa: E402,F401  (before diffusers/transformers)

RESULTS = ROOT / "bench" / "results" / "single_file.md"


def random_pipeline(config: Path, dest: Path) -> None:
    """The configuration's models with random fp16 weights, saved as a diffusers folder."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shutil.copytree(config, dest)
    torch.manual_seed(0)
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        cls.from_config(json.loads((config / name / "config.json").read_text())).half().save_pretrained(dest / name)
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if (config / name).is_dir():
            cls(CLIPTextConfig.from_pretrained(config / name)).half().save_pretrained(dest / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd15", help="a shipped configuration (default sd15)")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from export.single_file import CONFIGS, convert_to_folder
    from tests.fixtures.ldm_checkpoint import write_ldm_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        random_pipeline(CONFIGS / args.config, tmp / "source")
        checkpoint = write_ldm_checkpoint(tmp / "source", tmp / "model.safetensors")
        written = time.perf_counter() - start
        start = time.perf_counter()
        out = convert_to_folder(checkpoint, tmp / "converted", config=None, progress=print)
        converted = time.perf_counter() - start
        mismatched, tensors = [], 0
        for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if not (tmp / "source" / component).is_dir():
                continue
            want = {k: v for f in (tmp / "source" / component).glob("*.safetensors")
                    for k, v in load_file(str(f)).items()}
            got = {k: v for f in (out / component).glob("*.safetensors") for k, v in load_file(str(f)).items()}
            tensors += len(want)
            mismatched += [f"{component}.{k}" for k in want
                           if k not in got or not torch.equal(want[k], got[k].reshape(want[k].shape))]
        size_gb = checkpoint.stat().st_size / 1e9
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    line = (f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {args.config} | {size_gb:.2f} GB fp16 | "
            f"{written:.0f} s | {converted:.0f} s | {tensors} | {len(mismatched)} | {peak_gb:.1f} GB |")
    print(line)
    if mismatched:
        print("mismatched:", mismatched[:10])
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Single-file conversion at real size\n\n"
            "`nice .venv/bin/python bench/bench_single_file.py --config NAME` (random fp16 weights of the shipped "
            "architecture, LDM layout, converted with no --config: detection + shipped configuration)\n\n"
            "| when (UTC) | architecture | file | write | convert | tensors | mismatched | peak RSS |\n"
            "|---|---|---|---:|---:|---:|---:|---:|\n")
    with RESULTS.open("a") as f:
        f.write(line + "\n")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
