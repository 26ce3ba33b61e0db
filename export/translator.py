"""Export any image -> image generator as users bring it: a Pix2Pix U-Net, a CycleGAN
ResNet generator, a feed-forward style-transfer network.

  python -m export translator --module pix2pix.py:UnetGenerator --weights G.pth --name edges2digits \
      [--init-args '{"ngf": 64}'] [--input-range=-1,1] [--output-range=-1,1] [--size-multiple N]

The module and weights are read as for GANs (export/gan.py: FILE.py:NAME is a class or a
factory, weights any file export/weights.py reads: safetensors or torch, never unpickling code). The
generator takes [N, C_in, H, W] in --input-range and returns [N, C_out, kH, kW] in
--output-range (k = 1 for translators; an integer scale is read off a probe run).
Channels come from the probe too: C_in is the first of 3, 1, 4 the module accepts.

The side multiple a U-Net needs (2^depth) is found by probing sides 64 + m for m = 1, 2,
4, ... 256 (a network that needs a multiple of m runs at 64 + m only when m is one),
unless given. The graph contract and config are export/super_resolution.py's; the
service serves it on /v1/translate, tiled like super-resolution past the tile size
(exported here as 512 by default: a translator with instance or batch statistics over
the image, as CycleGAN's InstanceNorm, gives slightly different tiles than the whole;
keep --tile above the sizes it will see if that matters).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from export.core import ExportOptions, sha256
from export.errors import GANExportError, ImageExportError, WeightsError
from export.gan import build_user_generator, load_weights, parse_module_ref, parse_output_range
from export.super_resolution import SERVABLE_CHANNELS, ImageExportReport, ImageModelFacts, export_image_graph
from export.weights import read_state_dict

log = logging.getLogger(__name__)

DEFAULT_TILE = 512
PROBE_SIDE = 64


def _run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def probe_channels(model: nn.Module, side: int, batch: int = 2) -> tuple[int, torch.Tensor]:
    """(C_in, output) for the first channel count in 3, 1, 4 the module takes at `side`."""
    errors = []
    for c in (3, 1, 4):
        try:
            out = _run(model, torch.zeros(batch, c, side, side))
        except Exception as exc:
            errors.append(f"{c} channels: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        return c, out
    raise ImageExportError(f"forward(image) failed at {side}x{side} for 3, 1 and 4 input channels ("
                           + "; ".join(errors) + "); pass --size-multiple if the side is the problem")


def probe_size_multiple(model: nn.Module, channels: int, most: int = 256) -> int:
    """The smallest m in 1, 2, 4, ... such that the module maps a (64 + m)-sided image to a
    whole multiple of it: a U-Net of depth d runs at 64 + m iff 2^d divides m."""
    m = 1
    while m <= most:
        side = PROBE_SIDE + m
        try:
            out = _run(model, torch.zeros(1, channels, side, side + m))
            if out.dim() == 4 and out.shape[2] % side == 0 and out.shape[3] % (side + m) == 0:
                return m
        except Exception:
            pass
        m *= 2
    raise ImageExportError(f"the module fails at every side 64 + m (m = 1 .. {most}); give --size-multiple")


def export_translator(
    module: str,
    weights: str | Path,
    repository: Path,
    name: str,
    init_args: Mapping[str, Any] | None = None,
    input_range: str | tuple[float, float] = (-1.0, 1.0),
    output_range: str | tuple[float, float] = (-1.0, 1.0),
    size_multiple: int | None = None,
    options: ExportOptions | None = None,
    *,
    tile: int | None = None,
    tile_overlap: int = 32,
    state_dict_key: str | None = None,
    **shared,
) -> ImageExportReport:
    """FILE.py:NAME + weights -> a verified image -> image graph served on /v1/translate. `options`:
    the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    try:
        low_high_in, low_high_out = parse_output_range(input_range), parse_output_range(output_range)
        file, attr = parse_module_ref(module)
        state = read_state_dict(weights, state_dict_key)  # before running any of the user's code on them
        model = build_user_generator(module, init_args)
        load_weights(model, state, f"--weights {str(weights)!r}")
    except (GANExportError, WeightsError) as exc:
        raise ImageExportError(str(exc)) from exc
    model.eval()
    # 1. Probe: channels, size multiple, scale; outputs must be images, per sample.
    m = size_multiple or 1
    side = max(PROBE_SIDE, -(-PROBE_SIDE // m) * m)
    if size_multiple is None:
        c_in, _ = probe_channels(model, 256, batch=1)  # 256: any U-Net depth up to 8 runs there
        m = probe_size_multiple(model, c_in)
        side = -(-PROBE_SIDE // m) * m
    c_in, out = probe_channels(model, side)
    if out.dim() != 4 or out.shape[0] != 2:
        raise ImageExportError(f"forward(image) returned shape {list(out.shape)} for [2, {c_in}, {side}, {side}]: "
                               "it must return an image batch [N, C, H, W]")
    c_out, oh, ow = out.shape[1:]
    if oh % side or ow % side or oh // side != ow // side:
        raise ImageExportError(f"forward maps {side}x{side} to {oh}x{ow}: not an integer scale")
    if c_in not in SERVABLE_CHANNELS or c_out not in SERVABLE_CHANNELS:
        raise ImageExportError(f"{c_in} -> {c_out} channels; served images have 1, 3 or 4")
    if not torch.isfinite(out).all():
        raise ImageExportError("forward returned non-finite values for a zero image")
    facts = ImageModelFacts(
        task="translation", scale=oh // side, input_channels=c_in, output_channels=int(c_out), size_multiple=m,
        size_minimum=m, input_range=low_high_in, output_range=low_high_out, architecture=type(model).__name__,
        extra={"genserve.source_sha256": sha256(Path(weights)), "genserve.source_module": f"{file.name}:{attr}"})
    log.info("%s: %s, %d -> %d channels, x%d, sides multiples of %d", name, module, c_in, c_out, facts.scale, m)
    tile = tile or -(-DEFAULT_TILE // m) * m
    return export_image_graph(model, facts, repository, name, ExportOptions.given(options, **shared), tile=tile,
                              tile_overlap=min(tile_overlap, tile // 2 - 1))
