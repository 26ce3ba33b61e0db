"""Command line: `python -m export <command>`.

  python -m export gan --checkpoint zoo/checkpoints/cgan_digits.json --name cgan_digits
  python -m export diffusers --folder PATH --name NAME   # family from model_index.json (alias: sd)
  python -m export ddpm --folder PATH --name NAME        # a UNet2DModel folder (+ scheduler config)
  python -m export vae --folder PATH --name NAME         # an AutoencoderKL folder
  python -m export demo                # every demo model in zoo/ -> model_repository/
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from export.onnx_export import ParityError
from export.triton_config import DeploymentTarget

# Demo checkpoints committed in zoo/checkpoints and the model names they serve under.
CHECKPOINTS = Path(__file__).resolve().parents[1] / "zoo" / "checkpoints"
DEMO_GANS = {"dcgan_digits": "dcgan_digits", "cgan_digits": "cgan_digits"}
DEMO_DIFFUSION = {CHECKPOINTS / "sd_digits": "sd_digits"}
DEMO_DDPM = {CHECKPOINTS / "ddpm_digits": "ddpm_digits"}
DEMO_VAE = {CHECKPOINTS / "vae_digits": "vae_digits"}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="Triton model repository to write into (default: model_repository)")
    p.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                   help="instance kind in the generated configs (default: cpu)")
    p.add_argument("--instances", type=int, default=1, help="instances per model (default: 1)")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT plans (needs an NVIDIA GPU and the tensorrt package) and "
                        "write platform: tensorrt_plan configs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gan = sub.add_parser("gan", help="export one GAN generator checkpoint")
    gan.add_argument("--checkpoint", required=True, help="zoo checkpoint name or .json/.safetensors path")
    gan.add_argument("--name", required=True, help="model name in the repository")
    gan.add_argument("--version", type=int, default=1)
    gan.add_argument("--max-batch-size", type=int, default=16)
    _add_common(gan)
    for command, help_text in (
            ("diffusers", "export a diffusers pipeline folder; the family comes from its model_index.json"),
            ("sd", "alias of `diffusers`"),
            ("ddpm", "export a pixel-space DDPM/DDIM folder (UNet2DModel + scheduler config)"),
            ("vae", "export an AutoencoderKL folder (encoder with posterior moments, decoder)")):
        folder_cmd = sub.add_parser(command, help=help_text)
        folder_cmd.add_argument("--folder", type=Path, required=True, help="the diffusers folder")
        folder_cmd.add_argument("--name", required=True,
                                help="pipeline name; graphs are <name>_unet, <name>_vae_decoder, ...")
        folder_cmd.add_argument("--version", type=int, default=1)
        folder_cmd.add_argument("--max-batch-size", type=int, default=16)
        _add_common(folder_cmd)
    demo = sub.add_parser("demo", help="export every committed demo model")
    _add_common(demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from export.diffusers_folder import UnsupportedFolder, export_folder
    from export.gan import export_gan

    target = DeploymentTarget(args.target, args.instances)
    if args.tensorrt:
        from export.tensorrt import TensorRTUnavailable, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTUnavailable as exc:
            print(f"--tensorrt: {exc}", file=sys.stderr)
            return 2
    gans, pipelines = [], []  # pipelines: (folder, name, version, max batch, family or None to detect)
    if args.command == "gan":
        gans = [(args.checkpoint, args.name, args.version, args.max_batch_size)]
    elif args.command in ("sd", "diffusers", "ddpm", "vae"):
        family = {"ddpm": "ddpm", "vae": "vae"}.get(args.command)
        pipelines = [(args.folder, args.name, args.version, args.max_batch_size, family)]
    else:
        gans = [(ckpt, name, 1, 16) for ckpt, name in DEMO_GANS.items()]
        for demos, family in ((DEMO_DIFFUSION, None), (DEMO_DDPM, "ddpm"), (DEMO_VAE, "vae")):
            pipelines += [(folder, name, 1, 16, family) for folder, name in demos.items() if folder.exists()]
    try:
        for checkpoint, name, version, max_batch in gans:
            start = time.perf_counter()
            report = export_gan(checkpoint, args.repository, name, version, max_batch, target, tensorrt=args.tensorrt)
            print(f"{name}: {report.onnx_path} verified, max abs error {report.max_abs_error:.2e} "
                  f"({time.perf_counter() - start:.1f}s)")
        for folder, name, version, max_batch, family in pipelines:
            start = time.perf_counter()
            found, reports = export_folder(folder, args.repository, name, version, max_batch, target,
                                           family=family, tensorrt=args.tensorrt)
            print(f"{name}: {found}, {len(reports)} graphs verified ({time.perf_counter() - start:.1f}s)")
    except ParityError as exc:
        print(f"export FAILED parity check: {exc}", file=sys.stderr)
        return 1
    except UnsupportedFolder as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
