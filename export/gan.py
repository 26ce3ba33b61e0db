"""Export a GAN generator into a Triton model directory.

Two ways in, one way out:
  export_gan(checkpoint, ...)           a zoo checkpoint (<name>.json + .safetensors)
  export_gan_module("gen.py:Name", ...) a generator as users bring it: their Python file,
                                        a class or factory in it, a weight file as
                                        published (export/weights.py)
Both hand an eval-mode nn.Module and its GeneratorFacts to export_generator, which
describes the graph for the exporter core (export.core: trace, verify ONNX Runtime against
PyTorch, write the Triton config).

Graph contract (what services/pipelines/pipeline_gan.py relies on):
  inputs   z            FP32 [batch, *latent_shape] latent, already truncated by the caller:
                                                    [batch, N] (--latent-dim N) or e.g.
                                                    [batch, 100, 1, 1] (--latent-shape 100,1,1)
           class_label  INT64 [batch, 1] -> [batch] (conditional models only)
  outputs  image        FP32 [batch, C, H, W]      in the output range (default [-1, 1])
The generator's shape facts travel in the config's `parameters`, so a service learns
them from the repository alone (embedded) or from Triton's config API (Triton).
`genserve.latent_shape` is z's shape per image ("100,1,1"); `genserve.latent_dim` its number
of values, the whole shape for vector latents.
`genserve.image_size` is the height (what older readers take as the side);
`genserve.image_height` and `genserve.image_width` say both sides.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from export.core import ExportOptions, ParityCheck, export_graph, sha256
from export.errors import GANExportError
from export.triton_config import ModelConfigSpec, TensorSpec, default_batching
from export.weights import few_keys, read_state_dict
from services.contract import GeneratorFacts

log = logging.getLogger(__name__)

# Channel counts the service can encode as images (grey, RGB, RGBA).
SERVABLE_CHANNELS = (1, 3, 4)
TRACE_BATCH, VERIFY_BATCH = 2, 5  # the graph is traced at one batch size and verified at another




@dataclass
class ExportReport:
    model_dir: Path
    onnx_path: Path
    max_abs_error: float
    facts: GeneratorFacts | None = None


class _GraphContract(nn.Module):
    """Calls the generator positionally, whatever its forward's parameters are named, so
    the graph's inputs are `z` (and `class_label`) and its one output is FP32 `image`."""

    def __init__(self, generator: nn.Module, conditional: bool, cast_to_float32: bool = False):
        super().__init__()
        self.generator = generator
        self.conditional = conditional
        self.cast_to_float32 = cast_to_float32

    def forward(self, z: torch.Tensor, class_label: torch.Tensor | None = None) -> torch.Tensor:
        image = self.generator(z, class_label) if self.conditional else self.generator(z)
        return image.float() if self.cast_to_float32 else image


def export_generator(
    generator: nn.Module,
    facts: GeneratorFacts,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    *,
    atol: float = 1e-4,
    parameters: Mapping[str, str] | None = None,
    **shared,
) -> ExportReport:
    """Exports an eval-mode generator under the graph contract, verifies it, writes the config.

    `options`: the shared arguments (export.core.ExportOptions), or any of them as keywords.
    `parameters` are extra config parameters (provenance such as the weights' sha256).
    """
    options = ExportOptions.given(options, **shared)
    latent_shape, conditional = facts.latent_shape, facts.conditional
    module = generator if isinstance(generator, _GraphContract) else _GraphContract(generator, conditional)
    module.eval()

    # 1. The inputs: traced at one batch size, verified at another.
    def inputs(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        feeds = {"z": rng.standard_normal((batch, *latent_shape), dtype=np.float32)}
        if conditional:
            feeds["class_label"] = rng.integers(0, facts.num_classes, batch).astype(np.int64)
        return feeds

    rng = np.random.default_rng(0)
    example = inputs(TRACE_BATCH, rng)
    dynamic = {k: {0: "batch"} for k in example} | {"image": {0: "batch"}}
    check = ParityCheck(lambda: inputs(VERIFY_BATCH, rng), failed=lambda exc: (
        f"the graph traced at batch {TRACE_BATCH} failed at batch {VERIFY_BATCH} "
        f"(is the batch size fixed somewhere in forward, e.g. view({TRACE_BATCH}, ...)? "
        f"use view(z.shape[0], ...) or view(-1, ...)): {type(exc).__name__}: {exc}"))

    # 2. The Triton config: the generator's facts in its parameters.
    tensor_inputs = [TensorSpec("z", "float32", latent_shape)]
    if conditional:
        tensor_inputs.append(TensorSpec("class_label", "int64", (1,), reshape=()))
    c, h, w = facts.image_channels, facts.image_height, facts.image_width
    spec = ModelConfigSpec(
        name=name,
        inputs=tensor_inputs,
        outputs=[TensorSpec("image", "float32", (c, h, w))],
        # A GAN forward pass takes milliseconds: wait at most 2 ms to form a batch.
        batching=default_batching(options.max_batch_size, max_queue_delay_microseconds=2000),
        target=options.target,
        parameters={
            "genserve.pipeline": "gan",
            **facts.to_parameters(),
            **(parameters or {}),
        },
    )
    profile = None
    if options.tensorrt:  # 3. A TensorRT plan beside the ONNX graph, served by Triton's TensorRT platform.
        from export.tensorrt import gan_profile

        profile = gan_profile(latent_shape, conditional, options.max_batch_size)
    result = export_graph(
        module, spec, example, dynamic, lambda _: [check], Path(repository) / name, options, atol=atol,
        tensorrt_profile=profile, export_failed=lambda exc: GANExportError(
            f"torch.onnx.export failed for {name!r}: {type(exc).__name__}: {exc}"))
    log.debug("exported %s v%d (max abs error %.2e)", name, options.version, result.max_abs_error)
    return ExportReport(result.model_dir, result.onnx_path, result.max_abs_error, facts)


def export_gan(
    checkpoint: str | Path,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    *,
    atol: float = 1e-4,
    **shared,
) -> ExportReport:
    """Exports a zoo checkpoint (<name>.json + <name>.safetensors); the module knows its facts.
    `options`: the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    from zoo.checkpoint import checkpoint_stem, load_checkpoint
    from zoo.gan import DCGANGenerator

    generator = load_checkpoint(checkpoint)
    if not isinstance(generator, DCGANGenerator):
        raise GANExportError(f"{checkpoint} holds a {type(generator).__name__}, not a zoo GAN generator")
    s = generator.image_size
    facts = GeneratorFacts((generator.latent_dim,), generator.num_classes, generator.image_channels, s, s)
    source = {"genserve.source_sha256": sha256(checkpoint_stem(checkpoint).with_suffix(".safetensors"))}
    return export_generator(generator, facts, repository, name, ExportOptions.given(options, **shared), atol=atol,
                            parameters=source)


# --- generators as users bring them -------------------------------------------------------


def parse_module_ref(ref: str) -> tuple[Path, str]:
    """'path/to/gen.py:Generator' -> (path, 'Generator'); a clear error for anything else."""
    path, sep, attr = str(ref).rpartition(":")
    if not sep or not path or not attr.isidentifier():
        raise GANExportError(
            f"--module {ref!r}: expected FILE.py:NAME, the Python file and the generator class or "
            f"factory function in it (e.g. --module models/gen.py:Generator)")
    file = Path(path)
    if file.suffix != ".py":
        raise GANExportError(f"--module {ref!r}: {path!r} is not a .py file")
    if not file.is_file():
        raise GANExportError(f"--module {ref!r}: no such file {path!r}")
    return file, attr


def load_user_module(file: Path):
    """Imports a Python file by path (it need not be on sys.path). Its folder is appended to
    sys.path while it runs, so it can import its siblings as it would when run as a script."""
    file = Path(file).resolve()
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"_genserve_user_{stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise GANExportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses, typing and pickle look modules up here
    folder = str(file.parent)
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise GANExportError(f"importing {file} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(folder)
    return module


def build_user_generator(ref: str, init_args: Mapping[str, Any] | None = None) -> nn.Module:
    """Builds NAME(**init_args) from FILE.py:NAME; NAME is an nn.Module class or a factory."""
    file, attr = parse_module_ref(ref)
    module = load_user_module(file)
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items()
                       if not n.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
                       and getattr(v, "__module__", None) == module.__name__)
        raise GANExportError(
            f"{file} has no {attr!r}; classes and functions defined there: {', '.join(found) or 'none'}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise GANExportError(f"{file}:{attr} is a {type(factory).__name__}, not an nn.Module class or a function")
    kwargs = dict(init_args or {})
    try:
        generator = factory(**kwargs)
    except Exception as exc:
        raise GANExportError(
            f"building {attr}(**{json.dumps(kwargs)}) failed: {type(exc).__name__}: {exc} "
            f"(pass its keyword arguments with --init-args '{{\"name\": value}}')") from exc
    if not isinstance(generator, nn.Module):
        raise GANExportError(f"{file}:{attr}(...) returned a {type(generator).__name__}, not a torch.nn.Module")
    return generator


def load_weights(generator: nn.Module, state: Mapping[str, torch.Tensor], source: str = "the weights") -> None:
    """load_state_dict(strict=True), with missing, unexpected and mis-shaped keys named."""
    expected = generator.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {few_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {few_keys(unexpected)}")
    shapes = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if shapes:
        problems.append("shapes differ: " + ", ".join(
            f"{k!r} {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
            for k in sorted(shapes)[:5]))
    if problems:
        hint = " (do --init-args match the architecture the weights were trained with?)" if missing or shapes else ""
        heads = {k.split(".", 1)[0] for k in unexpected}
        if len(heads) == 1 and missing and {k.split(".", 1)[-1] for k in unexpected} >= missing:
            hint = f" (the model's weights are under the prefix {next(iter(heads))!r}: --state-dict-key " \
                   f"{next(iter(heads))} selects them)"
        raise GANExportError(f"{source} do not fit the model: {'; '.join(problems)}{hint}")
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GANExportError(f"{source} do not fit the model: {exc}") from exc


def probe_generator(
    generator: nn.Module, latent_shape: tuple[int, ...], num_classes: int,
    output_range: tuple[float, float] = (-1.0, 1.0), batch: int = 3,
) -> tuple[GeneratorFacts, bool]:
    """Runs the eval-mode generator once; returns its facts and whether its output needs a cast
    to float32. Refuses outputs the service cannot serve: not one 4-D NCHW float tensor, not
    finite, a channel count that is no image, or samples that depend on their batch-mates."""
    conditional = num_classes > 0
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, *latent_shape, generator=gen)
    labels = torch.arange(batch, dtype=torch.int64) % num_classes if conditional else None
    call = "forward(z, class_label)" if conditional else "forward(z)"

    def run(z: torch.Tensor, labels: torch.Tensor | None) -> Any:
        with torch.no_grad():
            return generator(z, labels) if conditional else generator(z)

    try:
        out = run(z, labels)
    except Exception as exc:
        hint = ("; a model that takes no class label is exported without --num-classes" if conditional else
                "; a class-conditional model needs --num-classes K")
        if len(latent_shape) == 1:
            given = f"--latent-dim {latent_shape[0]}"
            hint += (f"; a generator whose z is a map, such as [N, {latent_shape[0]}, 1, 1], takes "
                     f"--latent-shape {latent_shape[0]},1,1")
        else:
            given = f"--latent-shape {','.join(map(str, latent_shape))}"
        raise GANExportError(
            f"{call} with z float32 {list(z.shape)}"
            f"{f' and class_label int64 [{batch}]' if conditional else ''} failed: {type(exc).__name__}: {exc} "
            f"(is {given} right{hint}?)") from exc
    if not isinstance(out, torch.Tensor):
        raise GANExportError(f"{call} returned a {type(out).__name__}; it must return one image tensor [N, C, H, W]")
    shape = tuple(out.shape)
    if out.dim() != 4:
        raise GANExportError(f"{call} returned shape {list(shape)} ({out.dim()}-D) for a batch of {batch}; "
                             f"images must be 4-D NCHW [batch, channels, height, width]")
    if shape[0] != batch:
        raise GANExportError(f"{call} returned {shape[0]} images for a batch of {batch} latents")
    if not out.dtype.is_floating_point:
        raise GANExportError(f"{call} returned {out.dtype}; images must be floating point")
    if not torch.isfinite(out).all():
        raise GANExportError(f"{call} returned non-finite values (NaN or inf) for standard normal z")
    _, c, h, w = shape
    if c not in SERVABLE_CHANNELS:
        nhwc = " (it looks like NHWC: permute(0, 3, 1, 2) in forward)" if w in SERVABLE_CHANNELS else ""
        raise GANExportError(f"{call} returned {c} channels (shape {list(shape)}); served images have "
                             f"1 (grey), 3 (RGB) or 4 (RGBA) channels in NCHW{nhwc}")
    alone = run(z[:1], None if labels is None else labels[:1])
    if not torch.allclose(alone.float(), out[:1].float(), atol=1e-4, rtol=1e-3):
        raise GANExportError(
            f"{call}: an image depends on the other latents in its batch or on hidden randomness "
            f"(max difference {float((alone.float() - out[:1].float()).abs().max()):.3g} between a latent alone and in "
            f"a batch of {batch}); served images must depend on their own z and label only (batch norm in "
            f"eval mode, no torch.randn in forward)")
    low, high = output_range
    span = high - low
    lo_seen, hi_seen = float(out.min()), float(out.max())
    if lo_seen < low - 0.01 * span or hi_seen > high + 0.01 * span:
        log.warning("%s returned values in [%.3g, %.3g], outside the output range [%g, %g]: the service "
                    "clips them (is --output-range right?)", call, lo_seen, hi_seen, low, high)
    facts = GeneratorFacts(tuple(latent_shape), num_classes, c, h, w, (float(low), float(high)))
    return facts, out.dtype != torch.float32


def parse_output_range(text: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(text, tuple):
        low, high = text
    else:
        parts = str(text).split(",")
        try:
            low, high = (float(p) for p in parts)
        except ValueError:
            raise GANExportError(f"--output-range {text!r}: expected LOW,HIGH such as -1,1 or 0,1") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise GANExportError(f"--output-range {text!r}: need finite LOW < HIGH")
    return float(low), float(high)


def parse_latent_shape(latent_dim: int | None, latent_shape: str | tuple[int, ...] | None) -> tuple[int, ...]:
    """z's shape per image from --latent-dim N (a vector) or --latent-shape C,H,W (any rank)."""
    if latent_dim is not None and latent_shape is None:
        if latent_dim < 1:
            raise GANExportError(f"--latent-dim must be at least 1, got {latent_dim}")
        return (int(latent_dim),)
    if latent_shape is None or latent_dim is not None:
        raise GANExportError("give z's shape once: --latent-dim N for a vector, or --latent-shape C,H,W for a map")
    if isinstance(latent_shape, str):
        try:
            shape = tuple(int(part) for part in latent_shape.split(","))
        except ValueError:
            raise GANExportError(f"--latent-shape {latent_shape!r}: expected sizes separated by commas, "
                                 f"such as 100,1,1") from None
    else:
        shape = tuple(int(n) for n in latent_shape)
    if not shape or min(shape) < 1:
        raise GANExportError(f"--latent-shape {latent_shape!r}: every size must be at least 1")
    return shape


def export_gan_module(
    module: str,
    weights: str | Path,
    repository: Path,
    name: str,
    latent_dim: int | None = None,
    num_classes: int = 0,
    init_args: Mapping[str, Any] | None = None,
    output_range: str | tuple[float, float] = (-1.0, 1.0),
    options: ExportOptions | None = None,
    *,
    atol: float = 1e-4,
    latent_shape: str | tuple[int, ...] | None = None,
    state_dict_key: str | None = None,
    parameters: Mapping[str, str] | None = None,
    **shared,
) -> ExportReport:
    """Exports a generator as users bring it: `module` is "FILE.py:NAME" (an nn.Module class or a
    factory returning one, built with **init_args), `weights` a weight file as export.weights reads
    it (`state_dict_key` picks the state dict in it). z is a vector of `latent_dim` values or, for
    generators that take a map, of `latent_shape` ("100,1,1"). forward(z) or, when num_classes > 0,
    forward(z, class_label) returns NCHW images in `output_range`; channels and size are learned by
    running it once. `parameters`: more config parameters (e.g. the weights' licence); `options`:
    the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    shape = parse_latent_shape(latent_dim, latent_shape)
    if num_classes < 0:
        raise GANExportError(f"--num-classes must be 0 (unconditional) or more, got {num_classes}")
    if init_args is not None and not isinstance(init_args, Mapping):
        raise GANExportError(f"--init-args must be a JSON object of keyword arguments, got {init_args!r}")
    low_high = parse_output_range(output_range)
    file, attr = parse_module_ref(module)
    state = read_state_dict(weights, state_dict_key)  # before running any of the user's code on them
    generator = build_user_generator(module, init_args)
    load_weights(generator, state, f"--weights {str(weights)!r}")
    generator.eval()  # batch norm uses its running statistics, dropout is off
    facts, cast = probe_generator(generator, shape, num_classes, low_high)
    log.info("%s: %s, latent %s, %s, %dx%dx%d images in [%g, %g]", name, module, list(shape),
             f"{num_classes} classes" if num_classes else "unconditional",
             facts.image_channels, facts.image_height, facts.image_width, *low_high)
    provenance = {
        "genserve.source_sha256": sha256(Path(weights)),
        "genserve.source_module": f"{file.name}:{attr}",
        **(parameters or {}),
    }
    return export_generator(_GraphContract(generator, facts.conditional, cast), facts, repository, name,
                            ExportOptions.given(options, **shared), atol=atol, parameters=provenance)
