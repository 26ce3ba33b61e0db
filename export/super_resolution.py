"""Export image -> image graphs: super-resolution checkpoints as users bring them, and the
one graph contract every image-to-image model is served under.

  python -m export sr --weights RealESRGAN_x4plus.pth --name realesrgan_x4
  python -m export sr --ncnn realesrgan-x4plus.param --name realesrgan_x4   # ncnn files (export/ncnn.py)

The weight file is read by export/weights.py (format from the content, weights_only, nested
state dicts such as BasicSR's `params_ema`), and its state dict recognised by spandrel
(ESRGAN / Real-ESRGAN, Real-ESRGAN Compact, SPAN, SwinIR, HAT, ... from the shapes and names),
which says the architecture, scale, channels and size requirements. Those travel in the config, so the service
needs nothing else.

Graph contract (what services/pipelines/pipeline_image_to_image.py relies on):
  input   image         FP32 [batch, C_in, H, W]       H, W dynamic, multiples of size_multiple
  output  output_image  FP32 [batch, C_out, s*H, s*W]  s = genserve.scale

Parameters in the config (strings, as Triton stores them):
  genserve.pipeline        "image_to_image"
  genserve.task            "super_resolution" or "translation"
  genserve.scale           s (1 for translators)
  genserve.input_channels  C_in;  genserve.output_channels  C_out
  genserve.input_range     "0,1" (spandrel models) or the translator's, e.g. "-1,1"
  genserve.output_range    likewise
  genserve.size_multiple   sides must be multiples of it (the service pads by reflection)
  genserve.size_minimum    smallest side the architecture takes (the service pads up to it)
  genserve.tile            default tile side in input pixels (requests may ask another)
  genserve.tile_overlap    default overlap between tiles, input pixels
  genserve.architecture    e.g. "ESRGAN"; genserve.source_sha256 of the weights
  genserve.source_format   "ncnn" when read from ncnn files;  genserve.license  when given (--license)

Each graph is traced at one batch size and side and verified against PyTorch at another
batch size and at odd, unequal sides (export.onnx_export.verify_onnx), so an architecture
that bakes the traced size into its graph fails here, named, not in serving.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from export.core import ExportOptions, ParityCheck, export_graph, sha256
from export.errors import ImageExportError, ParityError
from export.triton_config import ModelConfigSpec, TensorSpec, default_batching
from services.contract import ImageToImageFacts

log = logging.getLogger(__name__)

SERVABLE_CHANNELS = (1, 3, 4)
DEFAULT_TILE = 128  # input pixels: a 4x model's tile is 512x512 out, ~3 MB of float32 per channel
DEFAULT_TILE_OVERLAP = 16
ATOL = 2e-3  # outputs in [0, 1]; deep conv stacks differ by ~1e-5 between ORT and PyTorch


@dataclass(frozen=True)
class ImageModelFacts:
    """What the service needs to know about an image -> image graph."""

    task: str  # "super_resolution" or "translation"
    scale: int
    input_channels: int
    output_channels: int
    size_multiple: int = 1
    size_minimum: int = 1
    input_range: tuple[float, float] = (0.0, 1.0)
    output_range: tuple[float, float] = (0.0, 1.0)
    architecture: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    def side(self, wanted: int) -> int:
        """The smallest side >= wanted (and >= the minimum) that is a multiple of size_multiple."""
        m = self.size_multiple
        return max(self.size_minimum, math.ceil(wanted / m) * m)

    def parameters(self, tile: int, tile_overlap: int) -> dict[str, str]:
        served = ImageToImageFacts(
            task=self.task, scale=self.scale, input_channels=self.input_channels,
            output_channels=self.output_channels, input_range=self.input_range, output_range=self.output_range,
            size_multiple=self.size_multiple, size_minimum=self.size_minimum, tile=tile, tile_overlap=tile_overlap,
            architecture=self.architecture)
        return {"genserve.pipeline": "image_to_image", **served.to_parameters(), **dict(self.extra)}


@dataclass
class ImageExportReport:
    model_dir: Path
    onnx_path: Path
    max_abs_error: float
    facts: ImageModelFacts


class _Clamped(nn.Module):
    """The model under the graph contract: one FP32 output, clamped to the output range
    (spandrel's own call clamps to [0, 1] the same way)."""

    def __init__(self, model: nn.Module, output_range: tuple[float, float]):
        super().__init__()
        self.model = model
        self.low, self.high = output_range

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.model(image)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().clamp(self.low, self.high)


def export_image_graph(
    model: nn.Module,
    facts: ImageModelFacts,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    *,
    tile: int = DEFAULT_TILE,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    atol: float = ATOL,
    **shared,
) -> ImageExportReport:
    """Traces `model` (eval mode, [B, C_in, H, W] -> [B, C_out, sH, sW]) with dynamic batch and
    sides, verifies it against PyTorch at another batch and odd unequal sides, writes the config.
    `options`: the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    options = ExportOptions.given(options, **shared)
    if options.tensorrt:
        raise ImageExportError("--tensorrt is not supported for image-to-image graphs yet (the ONNX graph is served "
                               "by ONNX Runtime, with its TensorRT accelerator on GPUs)")
    if tile < 1 or tile % facts.size_multiple or tile < facts.size_minimum:
        raise ImageExportError(f"--tile {tile}: must be a multiple of {facts.size_multiple} and at least "
                               f"{facts.size_minimum} for this architecture")
    if not 0 <= tile_overlap < tile // 2:
        raise ImageExportError(f"--tile-overlap {tile_overlap}: must be from 0 to less than half the tile ({tile})")
    module = _Clamped(model.eval(), facts.output_range).eval()
    rng = np.random.default_rng(0)
    low, high = facts.input_range

    def feeds(batch: int, h: int, w: int) -> dict[str, np.ndarray]:
        return {"image": rng.uniform(low, high, (batch, facts.input_channels, h, w)).astype(np.float32)}

    # 1. Traced at batch 1 and a square side; dynamic batch and spatial axes.
    trace = facts.side(32)
    example = feeds(1, trace, trace)
    spatial = {0: "batch", 2: "height", 3: "width"}

    # 2. Verified at batch 2 and unequal sides that are not the traced ones (odd where the
    #    architecture allows), so a size baked into the graph is caught here.
    h, w = facts.side(37), facts.side(53)
    if (h, w) == (trace, trace):
        h, w = facts.side(trace + 1), facts.side(trace + facts.size_multiple + 1)
    check = ParityCheck(lambda: feeds(2, h, w), failed=lambda exc: (
        f"{facts.architecture or 'the graph'} traced at {trace}x{trace} failed at {h}x{w} "
        f"(the traced size is fixed somewhere in the graph): {type(exc).__name__}: {str(exc)[:300]}"))

    # 3. The Triton config: the facts in its parameters.
    c_in, c_out = facts.input_channels, facts.output_channels
    spec = ModelConfigSpec(
        name=name,
        inputs=[TensorSpec("image", "float32", (c_in, -1, -1))],
        outputs=[TensorSpec("output_image", "float32", (c_out, -1, -1))],
        # Tiles of one image and of concurrent requests share calls: wait at most 5 ms for them.
        batching=default_batching(options.max_batch_size, max_queue_delay_microseconds=5000),
        target=options.target,
        parameters=facts.parameters(tile, tile_overlap),
        warmup_dims={"image": (c_in, trace, trace)},
    )
    result = export_graph(
        module, spec, example, {"image": spatial, "output_image": spatial}, lambda _: [check],
        Path(repository) / name, options, atol=atol, export_failed=lambda exc: ImageExportError(
            f"{facts.architecture or 'the model'} does not export to ONNX: {type(exc).__name__}: {str(exc)[:500]}"))
    log.info("%s: %s x%d, %d -> %d channels, verified at %dx%d (max abs error %.2e)", name,
             facts.architecture or facts.task, facts.scale, c_in, c_out, h, w, result.max_abs_error)
    return ImageExportReport(result.model_dir, result.onnx_path, result.max_abs_error, facts)


# --- super-resolution checkpoints through spandrel ------------------------------------------


def load_sr_checkpoint(weights: str | Path, state_dict_key: str | None = None):
    """A spandrel ImageModelDescriptor from a weight file as export.weights reads it."""
    from export.torchvision_compat import import_spandrel
    from export.weights import WeightsError, read_state_dict

    path = Path(weights)
    try:
        state = read_state_dict(path, state_dict_key)
    except WeightsError as exc:
        raise ImageExportError(str(exc)) from exc
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError as exc:
        raise ImageExportError(f"--weights {str(path)!r}: spandrel recognises no architecture in this state dict "
                               f"({exc or 'no match'}); supported: ESRGAN/Real-ESRGAN, Compact, SPAN, SwinIR, HAT, "
                               f"DAT, OmniSR, ... (spandrel {getattr(spandrel, '__version__', '')})") from exc
    except Exception as exc:
        raise ImageExportError(f"--weights {str(path)!r} could not be loaded: {type(exc).__name__}: "
                               f"{str(exc)[:300]}") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ImageExportError(f"--weights {str(path)!r} is a {descriptor.architecture.name} "
                               f"({type(descriptor).__name__}, e.g. inpainting with a mask): not an image -> image "
                               f"model /v1/upscale can serve")
    return descriptor


def sr_facts(descriptor) -> ImageModelFacts:
    arch = descriptor.architecture.name
    req = descriptor.size_requirements
    if req.square:
        raise ImageExportError(f"{arch} needs square inputs: not served (tiles of any shape are cut from images)")
    if descriptor.input_channels not in SERVABLE_CHANNELS or descriptor.output_channels not in SERVABLE_CHANNELS:
        raise ImageExportError(f"{arch}: {descriptor.input_channels} -> {descriptor.output_channels} channels; "
                               f"served images have 1, 3 or 4")
    return ImageModelFacts(
        task="super_resolution" if descriptor.scale > 1 else "restoration", scale=int(descriptor.scale),
        input_channels=int(descriptor.input_channels), output_channels=int(descriptor.output_channels),
        size_multiple=int(req.multiple_of), size_minimum=max(1, int(req.minimum)),
        architecture=arch, extra={"genserve.purpose": descriptor.purpose, "genserve.tags": ",".join(descriptor.tags)})


def load_ncnn_model(param: str | Path, bin_path: str | Path | None = None):
    """A spandrel ImageModelDescriptor from an ncnn .param/.bin pair (export/ncnn.py names the weights)."""
    from export.ncnn import ncnn_state_dict, read_ncnn
    from export.torchvision_compat import import_spandrel

    graph = read_ncnn(param, bin_path)
    architecture, state = ncnn_state_dict(graph)
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except Exception as exc:
        raise ImageExportError(f"--ncnn {str(param)!r}: the weights read as {architecture} do not load into "
                               f"spandrel's {architecture}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    if descriptor.architecture.id != architecture:
        raise ImageExportError(f"--ncnn {str(param)!r}: read as {architecture}, but spandrel recognises "
                               f"{descriptor.architecture.id} in the weights")
    return descriptor, graph


def export_sr(
    weights: str | Path,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    *,
    tile: int | None = None,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    license: str | None = None,
    ncnn_bin: str | Path | None = None,
    state_dict_key: str | None = None,
    **shared,
) -> ImageExportReport:
    """A super-resolution checkpoint as users bring it -> a verified graph in the repository.
    `weights` is a weight file (export/weights.py), or an ncnn `.param` (weights in `ncnn_bin`,
    default the .bin beside it). `options`: the shared arguments (export.core.ExportOptions), or
    any of them as keywords."""
    if Path(weights).suffix.lower() == ".param":
        from export.ncnn import sha256_of

        descriptor, graph = load_ncnn_model(weights, ncnn_bin)
        source = {"genserve.source_format": "ncnn",
                  "genserve.source_sha256": sha256_of(graph.param_path, graph.bin_path)}
    else:
        descriptor = load_sr_checkpoint(weights, state_dict_key)
        source = {"genserve.source_sha256": sha256(weights)}
    facts = sr_facts(descriptor)
    extra = {**facts.extra, **source, **({"genserve.license": license} if license else {})}
    facts = ImageModelFacts(**{**facts.__dict__, "extra": extra})
    tile = tile or facts.side(DEFAULT_TILE)
    try:
        return export_image_graph(descriptor.model, facts, repository, name, ExportOptions.given(options, **shared),
                                  tile=tile, tile_overlap=tile_overlap)
    except ParityError as exc:
        raise ParityError(f"{facts.architecture} does not export faithfully: {exc}") from exc
