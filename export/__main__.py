"""Command line: `python -m export <command>`.

  python -m export gan --checkpoint zoo/checkpoints/cgan_digits.json --name cgan_digits
  python -m export gan --module gen.py:Generator --weights G.safetensors --name NAME --latent-dim 128
                       [--latent-shape 100,1,1 instead of --latent-dim] [--state-dict-key KEY]
                       [--num-classes K] [--init-args '{"ngf": 64}'] [--output-range=-1,1]
  python -m export diffusers --folder PATH --name NAME   # family from model_index.json (alias: sd)
                       [--verify full|small|off] [--verify-memory GIB] [--dtype fp32|fp16]
  python -m export sd --checkpoint FILE --name NAME [--config sd15|sd21|sd21-base|sdxl-base|sdxl-refiner|FOLDER]
                                       # a single-file SD/SDXL checkpoint (.safetensors/.ckpt)
  python -m export controlnet --folder PATH --pipeline NAME [--name CN]   # a ControlNetModel for an SD/SDXL pipeline
  python -m export ddpm --folder PATH --name NAME        # a UNet2DModel folder (+ scheduler config)
  python -m export vae --folder PATH --name NAME         # an AutoencoderKL folder
  python -m export stylegan --module FILE.py:NAME --weights PATH --name NAME [--init-args JSON]
                                       # NVIDIA-style G.mapping/G.synthesis -> NAME_mapping + NAME_synthesis
  python -m export sr --weights PATH --name NAME   # a super-resolution .pth/.safetensors (spandrel)
  python -m export sr --ncnn MODEL.param --name NAME   # the same from ncnn files (ESRGAN, Real-ESRGAN Compact)
  python -m export translator --module FILE.py:NAME --weights PATH --name NAME [--init-args JSON]
  python -m export lora --pipeline NAME --weights FILE --name ADAPTER   # a LoRA (diffusers/PEFT or kohya)
  python -m export lora-slots --pipeline NAME   # U-Net / text encoder graphs that take adapters per row
  python -m export demo                # every demo model in zoo/ and packaged (export/pretrained.py)
                                       # -> model_repository/

Every --weights is read from its content (safetensors, torch zip or legacy torch file, whatever
the extension), never unpickling code; --state-dict-key picks the state dict inside a training
checkpoint that holds several (see export/weights.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from export import image_to_image_cli, lora
from export.core import ExportOptions
from export.errors import run_command
from export.verification import DTYPES, VERIFY_MODES

if TYPE_CHECKING:
    from export.gan import ExportReport
    from export.stylegan import StyleGANExportReport

# Demo checkpoints committed in zoo/checkpoints and the model names they serve under.
CHECKPOINTS = Path(__file__).resolve().parents[1] / "zoo" / "checkpoints"
DEMO_GANS = {"dcgan_digits": "dcgan_digits", "cgan_digits": "cgan_digits"}
DEMO_DIFFUSION = {CHECKPOINTS / "sd_digits": "sd_digits"}
DEMO_DDPM = {CHECKPOINTS / "ddpm_digits": "ddpm_digits"}
DEMO_VAE = {CHECKPOINTS / "vae_digits": "vae_digits"}
DEMO_STYLEGAN = {CHECKPOINTS / "stylegan_digits": "stylegan_digits"}
DEMO_CONTROLNETS = {CHECKPOINTS / "controlnet_digits_outline": ("sd_digits", "outline")}  # folder: (pipeline, name)


WEIGHTS_HELP = ("the weight file as published: safetensors, or a torch file (.pt .pth .bin .ckpt .tar ...) read "
                "with torch.load(weights_only=True, map_location='cpu'); pickled modules are refused")


def add_state_dict_key(p) -> None:
    p.add_argument("--state-dict-key", metavar="KEY[/KEY...]",
                   help="the state dict inside a checkpoint that holds several (e.g. g_ema, params_ema, "
                        "netG_state_dict); a last part that names no dict selects the tensors under that "
                        "prefix (state_dict/generator). Default: the only dict of tensors in the file")


def _glue_negative_values(argv: list[str]) -> list[str]:
    """`--output-range -1,1` -> `--output-range=-1,1`: argparse takes a value that starts with '-'
    (and is no plain negative number) for an option and would refuse the range."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--output-range" and arg.startswith("-"):
            out[-1] = f"--output-range={arg}"
        else:
            out.append(arg)
    return out


def _check_gan_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--weights and --latent-dim come with --module; the facts a zoo checkpoint knows are not given twice."""
    byo = {"--weights": args.weights, "--latent-dim": args.latent_dim, "--latent-shape": args.latent_shape,
           "--state-dict-key": args.state_dict_key, "--num-classes": args.num_classes,
           "--init-args": args.init_args, "--output-range": args.output_range}
    if args.checkpoint is not None:
        given = [flag for flag, value in byo.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)}: only with --module (a zoo checkpoint describes itself)")
        return
    shape = "z's shape: --latent-dim N (a vector) or --latent-shape C,H,W (a map)"
    if args.latent_dim is not None and args.latent_shape is not None:
        parser.error(f"give {shape}, not both")
    given_shape = args.latent_shape if args.latent_dim is None else args.latent_dim
    missing = [flag for flag, value in (("--weights", args.weights), (shape, given_shape)) if value is None]
    if missing:
        parser.error(f"--module needs {' and '.join(missing)}")
    if args.init_args is not None:
        try:
            args.init_args = json.loads(args.init_args)
        except json.JSONDecodeError as exc:
            parser.error(f"--init-args is not valid JSON ({exc}): give an object such as '{{\"ngf\": 64}}'")
        if not isinstance(args.init_args, dict):
            parser.error(f"--init-args must be a JSON object of keyword arguments, got {type(args.init_args).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gan = sub.add_parser(
        "gan", help="export one GAN generator: a zoo checkpoint, or your own module and weights",
        description="Export one GAN generator. Either a zoo checkpoint (--checkpoint), or a generator as you "
                    "have it (--module FILE.py:NAME --weights PATH --latent-dim N): NAME is an nn.Module class "
                    "or a factory function returning one, built with --init-args; forward(z) or, with "
                    "--num-classes K, forward(z, class_label) returns NCHW images in --output-range. Image "
                    "channels and size are learned by running it once; the graph is verified against PyTorch.")
    source = gan.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="zoo checkpoint name or .json/.safetensors path")
    source.add_argument("--module", metavar="FILE.py:NAME",
                        help="your generator: a Python file (need not be on sys.path) and the class or factory in it")
    gan.add_argument("--name", required=True, help="model name in the repository")
    byo = gan.add_argument_group("with --module")
    byo.add_argument("--weights", metavar="PATH", help=WEIGHTS_HELP)
    add_state_dict_key(byo)
    byo.add_argument("--latent-dim", type=int, metavar="N", help="width of z, the generator's first input")
    byo.add_argument("--latent-shape", metavar="C,H,W",
                     help="z's shape per image when it is not a vector, e.g. 100,1,1 for a DCGAN taking "
                          "[N, 100, 1, 1] (instead of --latent-dim)")
    byo.add_argument("--num-classes", type=int, metavar="K",
                     help="class-conditional: forward(z, class_label) with int64 labels in [0, K) (default: 0, "
                          "unconditional)")
    byo.add_argument("--init-args", metavar="JSON", help="keyword arguments for NAME, a JSON object (default: {})")
    byo.add_argument("--output-range", metavar="LOW,HIGH",
                     help="range of the generator's output, e.g. --output-range=-1,1 (default) or 0,1")
    ExportOptions.add_arguments(gan)
    for command, help_text in (
            ("diffusers", "export a diffusers pipeline folder; the family comes from its model_index.json"),
            ("sd", "alias of `diffusers`"),
            ("ddpm", "export a pixel-space DDPM/DDIM folder (UNet2DModel + scheduler config)"),
            ("vae", "export an AutoencoderKL folder (encoder with posterior moments, decoder)")):
        folder_cmd = sub.add_parser(command, help=help_text)
        if command in ("diffusers", "sd"):
            source = folder_cmd.add_mutually_exclusive_group(required=True)
            source.add_argument("--folder", type=Path, help="the diffusers folder")
            source.add_argument("--checkpoint", type=Path, metavar="FILE",
                                help="a single-file SD 1.x/2.x/SDXL checkpoint (.safetensors/.ckpt, LDM layout), "
                                     "converted offline with diffusers' single-file loader (export/single_file.py)")
            folder_cmd.add_argument("--config", metavar="NAME_OR_FOLDER",
                                    help="with --checkpoint: sd15, sd21, sd21-base, sdxl-base, sdxl-refiner, or a "
                                         "diffusers folder of the same architecture (default: detected from the "
                                         "checkpoint's keys and shapes)")
        else:
            folder_cmd.add_argument("--folder", type=Path, required=True, help="the diffusers folder")
        folder_cmd.add_argument("--name", required=True,
                                help="pipeline name; graphs are <name>_unet, <name>_vae_decoder, ...")
        if command in ("diffusers", "sd"):
            folder_cmd.add_argument("--max-sequence-length", type=int, metavar="TOKENS",
                                    help="FLUX: the T5 length prompts are padded to (default 512, as FluxPipeline); "
                                         "longer prompts are refused")
            folder_cmd.add_argument("--native-size", type=int, metavar="PIXELS",
                                    help="FLUX: the default image side (default FluxPipeline's: 128 x the VAE factor)")
            folder_cmd.add_argument("--no-deepcache", dest="deepcache", action="store_false",
                                    help="SD/SDXL: leave out DeepCache's shallow U-Net graph and the full U-Net's "
                                         "deep_features output (requests' cache_interval is then limited to 1)")
            folder_cmd.add_argument("--no-controlnet-inputs", dest="controlnet_inputs", action="store_false",
                                    help="SD/SDXL: leave out the U-Net's ControlNet residual inputs (the pipeline "
                                         "then takes no ControlNet; see export/controlnet.py)")
        folder_cmd.add_argument("--verify", choices=VERIFY_MODES, default="full",
                                help="parity checks against PyTorch, sized from each graph's activation memory: "
                                     "full (default: a small non-square size at batch 3 for the dynamic axes, "
                                     "and the largest native-size check that fits), small (the first only), "
                                     "off")
        folder_cmd.add_argument("--verify-memory", type=float, metavar="GIB",
                                help="activation memory a check may take (default: half the available memory, "
                                     "less the graph's weights)")
        folder_cmd.add_argument("--dtype", choices=DTYPES, default="fp32",
                                help="fp16: graphs in half precision for GPUs (inputs and outputs stay fp32; checked "
                                     "on CPU against the fp32 module); a VAE whose config sets force_upcast (SD's, "
                                     "SDXL's) and FLUX's T5 stay fp32")
        ExportOptions.add_arguments(folder_cmd)
    stylegan = sub.add_parser(
        "stylegan", help="export a StyleGAN generator (NVIDIA interface) as <name>_mapping + <name>_synthesis",
        description="Export a StyleGAN-style generator with NVIDIA's interface (z_dim, c_dim, w_dim, num_ws, "
                    "img_resolution, img_channels, mapping(z, c), synthesis(ws)) as two verified graphs, "
                    "<name>_mapping (z[, c] -> w) and <name>_synthesis (ws -> image), with w_avg.json and "
                    "directions.json beside the mapping config. See export/stylegan.py for the contract.")
    stylegan.add_argument("--module", required=True, metavar="FILE.py:NAME",
                          help="the generator: a Python file and the nn.Module class or factory in it")
    stylegan.add_argument("--weights", required=True, metavar="PATH", help=WEIGHTS_HELP)
    add_state_dict_key(stylegan)
    stylegan.add_argument("--name", required=True, help="pipeline name; graphs are <name>_mapping, <name>_synthesis")
    stylegan.add_argument("--init-args", metavar="JSON", help="keyword arguments for NAME, a JSON object")
    ExportOptions.add_arguments(stylegan)
    image_to_image_cli.add_parsers(sub, add_state_dict_key)
    controlnet = sub.add_parser(
        "controlnet", help="export a diffusers ControlNetModel folder for an SD or SDXL pipeline in the repository",
        description="Export a ControlNet (SD 1.x/2.x, SDXL) as <pipeline>_controlnet_<name>, checked against the "
                    "pipeline's U-Net (which must have been exported with its ControlNet inputs) and verified "
                    "against PyTorch. Requests name it in `controlnet: [{\"model\": name, ...}]`.")
    controlnet.add_argument("--folder", type=Path, required=True,
                            help="the ControlNetModel folder (config.json + weights)")
    controlnet.add_argument("--pipeline", required=True, help="the SD or SDXL pipeline it controls")
    controlnet.add_argument("--name", help="its name in requests (default: the folder's name)")
    ExportOptions.add_arguments(controlnet)
    lora.add_parsers(sub)
    demo = sub.add_parser("demo", help="export every committed demo model")
    ExportOptions.add_arguments(demo, sizes=False)
    args = parser.parse_args(_glue_negative_values(sys.argv[1:] if argv is None else list(argv)))
    if args.command == "gan":
        _check_gan_args(gan, args)
    if args.command == "stylegan" and args.init_args is not None:
        try:
            args.init_args = json.loads(args.init_args)
        except json.JSONDecodeError as exc:
            stylegan.error(f"--init-args is not valid JSON ({exc}): give an object such as '{{\"w_dim\": 512}}'")
        if not isinstance(args.init_args, dict):
            stylegan.error(f"--init-args must be a JSON object of keyword arguments, got "
                           f"{type(args.init_args).__name__}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # a failure of `demo` is named as the GAN exporter's, as it always was
    return run_command("gan" if args.command == "demo" else args.command, lambda: _run(parser, sub, args))


def _run(parser: argparse.ArgumentParser, sub, args: argparse.Namespace) -> int:
    if args.command in ("sr", "translator"):
        return image_to_image_cli.run(sub.choices[args.command], args)
    if args.command in ("lora", "lora-slots"):
        return lora.run(args)
    if args.command == "controlnet":
        return _export_controlnet(args)
    return _export(parser, args)


def _export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The GAN, StyleGAN, diffusers-folder and demo commands."""
    from export.diffusers_folder import export_folder
    from export.gan import export_gan, export_gan_module
    from export.stylegan import export_stylegan_checkpoint, export_stylegan_module

    options = ExportOptions.from_args(args)
    if args.tensorrt:
        from export.tensorrt import require_tensorrt

        require_tensorrt()
    gans: list[tuple[str, Callable[[], ExportReport]]] = []
    pipelines: list[tuple[Path | None, str, str | None]] = []  # (folder, name, family or None to detect)
    stylegans: list[tuple[str, Callable[[], StyleGANExportReport]]] = []
    if args.command == "gan" and args.module is not None:
        gans = [(args.name, partial(
            export_gan_module, args.module, args.weights, args.repository, args.name, args.latent_dim,
            latent_shape=args.latent_shape, state_dict_key=args.state_dict_key, num_classes=args.num_classes or 0,
            init_args=args.init_args, output_range=args.output_range or "-1,1", options=options))]
    elif args.command == "gan":
        gans = [(args.name, partial(export_gan, args.checkpoint, args.repository, args.name, options))]
    elif args.command == "stylegan":
        stylegans = [(args.name, partial(
            export_stylegan_module, args.module, args.weights, args.repository, args.name,
            init_args=args.init_args, options=options, state_dict_key=args.state_dict_key))]
    elif args.command in ("sd", "diffusers", "ddpm", "vae"):
        family = {"ddpm": "ddpm", "vae": "vae"}.get(args.command)
        if getattr(args, "config", None) is not None and args.folder is not None:
            parser.error("--config goes with --checkpoint (a folder carries its own configuration)")
        if args.folder is None and (args.max_sequence_length or args.native_size):
            parser.error("--max-sequence-length and --native-size are FLUX options; --checkpoint reads SD/SDXL files")
        pipelines = [(args.folder, args.name, family)]
    else:
        from export.pretrained import packaged_gan_exports

        gans = [(name, partial(export_gan, ckpt, args.repository, name, options)) for ckpt, name in DEMO_GANS.items()]
        gans += packaged_gan_exports(args.repository, options.target, args.tensorrt)
        for demos, family in ((DEMO_DIFFUSION, None), (DEMO_DDPM, "ddpm"), (DEMO_VAE, "vae")):
            pipelines += [(folder, name, family) for folder, name in demos.items() if folder.exists()]
        stylegans = [(name, partial(export_stylegan_checkpoint, stem, args.repository, name, options))
                     for stem, name in DEMO_STYLEGAN.items() if stem.with_suffix(".json").exists()]
    for name, export in gans:
        start = time.perf_counter()
        report = export()
        print(f"{name}: {report.onnx_path} verified, max abs error {report.max_abs_error:.2e} "
              f"({time.perf_counter() - start:.1f}s)")
    for name, export_pair in stylegans:
        start = time.perf_counter()
        pair = export_pair()
        errors = ", ".join(f"{k} {v:.2e}" for k, v in pair.max_abs_error.items())
        print(f"{name}: {pair.mapping_dir.name} + {pair.synthesis_dir.name} verified, max abs error "
              f"{errors} ({time.perf_counter() - start:.1f}s)")
    for folder, name, family in pipelines:
        start = time.perf_counter()
        unet = {"deepcache": getattr(args, "deepcache", True),
                "controlnet_inputs": getattr(args, "controlnet_inputs", True)}
        if folder is None:  # --checkpoint: a single file, converted to a folder first
            from export.single_file import export_checkpoint

            found, reports = export_checkpoint(args.checkpoint, args.repository, name, args.config, options, **unet)
        else:
            found, reports = export_folder(folder, args.repository, name, options.version, options.max_batch_size,
                                           options.target, family=family, tensorrt=options.tensorrt,
                                           max_sequence_length=getattr(args, "max_sequence_length", None),
                                           native_size=getattr(args, "native_size", None), graphs=options.graphs,
                                           **unet)
        print(f"{name}: {found}, {len(reports)} graphs verified ({time.perf_counter() - start:.1f}s)")
    if args.command == "demo":
        from export.controlnet import export_controlnet

        for line in image_to_image_cli.export_demos(args.repository, options.target):
            print(line)
        for folder, (pipeline, name) in DEMO_CONTROLNETS.items():  # after their pipelines
            if folder.exists():
                report = export_controlnet(folder, args.repository, pipeline, name, options)
                print(f"{report.name}: verified, max abs error {report.max_abs_error:.2e}")
    return 0


def _export_controlnet(args: argparse.Namespace) -> int:
    from export.controlnet import export_controlnet

    start = time.perf_counter()
    report = export_controlnet(args.folder, args.repository, args.pipeline, args.name, ExportOptions.from_args(args))
    print(f"{report.name}: verified, max abs error {report.max_abs_error:.2e} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
