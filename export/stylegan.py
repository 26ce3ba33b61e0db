"""Export a StyleGAN-style generator (NVIDIA stylegan2-ada / stylegan3 interface) as two graphs.

The generator must have NVIDIA's attributes: `z_dim`, `c_dim` (0 = unconditional),
`w_dim`, `num_ws`, `img_resolution`, `img_channels`, `mapping(z, c, truncation_psi=1)`
-> ws [B, num_ws, w_dim] and `synthesis(ws)` -> img [B, C, H, W]. Where synthesis takes
`noise_mode` (NVIDIA's does), it is exported with noise_mode="const", so an image is a
function of its ws alone.

    python -m export stylegan --module FILE.py:NAME --weights PATH --name MODEL [--init-args JSON]
    python -m export demo      # includes zoo/checkpoints/stylegan_digits as `stylegan_digits`

Contract (what the serving pipeline relies on; nothing else is promised):

  <MODEL>_mapping
    inputs   z      FP32 [batch, z_dim]
             c      FP32 [batch, c_dim]   one-hot class; only when c_dim > 0
    output   w      FP32 [batch, w_dim]   = mapping(z, c, truncation_psi=1)[:, 0]
    Truncation is the caller's: w' = w_avg + psi * (w - w_avg), then w' is broadcast to
    num_ws rows (or rows mixed from several w for style mixing).
  <MODEL>_synthesis
    input    ws     FP32 [batch, num_ws, w_dim]
    output   image  FP32 [batch, C, H, W] in [-1, 1] (genserve.output_range)
  Both graphs have a dynamic batch axis (max_batch_size in the config, dynamic batching)
  and are verified against PyTorch at a batch size other than the traced one.

  Config parameters on both: genserve.pipeline = "stylegan", genserve.pipeline_name = MODEL,
  genserve.component = "mapping" | "synthesis", genserve.z_dim, genserve.c_dim,
  genserve.w_dim, genserve.num_ws, genserve.image_channels, genserve.image_height,
  genserve.image_width, genserve.output_range ("-1,1"), genserve.source_sha256.

  Files beside <MODEL>_mapping/config.pbtxt:
    w_avg.json       {"w_avg": [w_dim floats]}: the generator's mapping.w_avg buffer (the
                     moving average of w kept in training, NVIDIA's truncation centre);
                     for a generator without one, the mean of w over 10,000 seeded z
                     (classes uniform), and "source" says which.
    directions.json  {"directions": {name: [w_dim floats]}, ...}: for class-conditional
                     models one direction per class, "class_<k>" (k = the class name where
                     the module has `class_names`, else the index): the mean of w over
                     1,000 seeded z for class k minus the mean over all classes (the mean
                     of the class means). Raw differences, not unit vectors: w + 1.0 * d
                     moves a w at the global mean to the class-k mean, so strength 1.0
                     means "one class-mean shift". {} for unconditional models.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from export.core import ExportOptions, ParityCheck, export_graph, sha256
from export.errors import StyleGANExportError
from export.gan import SERVABLE_CHANNELS, build_user_generator, load_weights, parse_module_ref
from export.triton_config import ModelConfigSpec, TensorSpec, default_batching
from export.weights import read_state_dict
from services.contract import StyleGANFacts

log = logging.getLogger(__name__)

TRACE_BATCH, VERIFY_BATCH = 2, 5
REQUIRED = ("z_dim", "c_dim", "w_dim", "num_ws", "img_resolution", "img_channels", "mapping", "synthesis")
DIRECTION_SAMPLES, DIRECTION_SEED = 1000, 0
W_AVG_SAMPLES = 10_000

# An nn.Module with NVIDIA's interface (REQUIRED), checked at run time by probe_stylegan: its
# attributes are plain ints and callables, which nn.Module's typing (Tensor | Module) cannot state.
NvidiaGenerator = Any


@dataclass
class StyleGANExportReport:
    mapping_dir: Path
    synthesis_dir: Path
    max_abs_error: dict[str, float]
    facts: StyleGANFacts


class MappingGraph(nn.Module):
    """(z[, c]) -> w = mapping(z, c, truncation_psi=1)[:, 0]."""

    def __init__(self, generator: NvidiaGenerator) -> None:
        super().__init__()
        self.generator = generator
        self.conditional = int(generator.c_dim) > 0

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        ws = self.generator.mapping(z, c if self.conditional else None, truncation_psi=1)
        return ws[:, 0].float()


class SynthesisGraph(nn.Module):
    """ws -> image; noise_mode="const" where synthesis takes one (NVIDIA's random noise otherwise)."""

    def __init__(self, generator: NvidiaGenerator) -> None:
        super().__init__()
        self.generator = generator
        params: Mapping[str, inspect.Parameter]
        try:
            params = inspect.signature(generator.synthesis.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self.kwargs = {"noise_mode": "const"} if "noise_mode" in params else {}

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        return self.generator.synthesis(ws, **self.kwargs).float()


def _one_hot(labels: torch.Tensor, c_dim: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, c_dim).float()


def probe_stylegan(generator: NvidiaGenerator, output_range: tuple[float, float] = (-1.0, 1.0)) -> StyleGANFacts:
    """Checks NVIDIA's attributes and runs mapping + synthesis once; refuses what cannot be served."""
    missing = [a for a in REQUIRED if not hasattr(generator, a)]
    if missing:
        raise StyleGANExportError(
            f"{type(generator).__name__} lacks {', '.join(missing)}: a StyleGAN generator here has NVIDIA's "
            f"interface ({', '.join(REQUIRED)}); other GANs export with `python -m export gan`")
    z_dim, c_dim, w_dim, num_ws = (int(getattr(generator, a)) for a in ("z_dim", "c_dim", "w_dim", "num_ws"))
    if z_dim < 1 or c_dim < 0 or w_dim < 1 or num_ws < 1:
        raise StyleGANExportError(f"need z_dim, w_dim, num_ws >= 1 and c_dim >= 0; got z_dim {z_dim}, "
                                  f"c_dim {c_dim}, w_dim {w_dim}, num_ws {num_ws}")
    batch = 3
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, z_dim, generator=gen)
    c = _one_hot(torch.arange(batch) % c_dim, c_dim) if c_dim else None
    try:
        with torch.no_grad():
            ws = generator.mapping(z, c, truncation_psi=1)
    except Exception as exc:
        raise StyleGANExportError(f"mapping(z [{batch}, {z_dim}], c {'one-hot' if c_dim else 'None'}) failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(ws, torch.Tensor) or tuple(ws.shape) != (batch, num_ws, w_dim):
        got = list(ws.shape) if isinstance(ws, torch.Tensor) else type(ws).__name__
        raise StyleGANExportError(f"mapping returned {got}, expected ws [{batch}, num_ws {num_ws}, w_dim {w_dim}]")
    if not torch.allclose(ws[:, :1].expand_as(ws), ws):
        raise StyleGANExportError("mapping(z, c, truncation_psi=1) returned different w per layer; the "
                                  "mapping graph exports one w per sample, broadcast by the caller")
    try:
        with torch.no_grad():
            img = SynthesisGraph(generator)(ws)
    except Exception as exc:
        raise StyleGANExportError(f"synthesis(ws [{batch}, {num_ws}, {w_dim}]) failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
    if img.dim() != 4 or img.shape[0] != batch:
        raise StyleGANExportError(f"synthesis returned {list(img.shape)}; images must be [batch, C, H, W]")
    _, ch, h, w = img.shape
    if ch not in SERVABLE_CHANNELS:
        raise StyleGANExportError(f"synthesis returned {ch} channels; served images have 1, 3 or 4 (NCHW)")
    if ch != int(generator.img_channels):
        raise StyleGANExportError(f"synthesis returned {ch} channels but img_channels is {generator.img_channels}")
    if not torch.isfinite(img).all():
        raise StyleGANExportError("synthesis returned non-finite values")
    with torch.no_grad():
        alone = SynthesisGraph(generator)(ws[:1])
    if not torch.allclose(alone, img[:1], atol=1e-4, rtol=1e-3):
        raise StyleGANExportError("synthesis: an image depends on its batch-mates or on hidden randomness "
                                  "(noise inputs must be constant, batch norm in eval mode)")
    return StyleGANFacts(z_dim, c_dim, w_dim, num_ws, ch, h, w, (float(output_range[0]), float(output_range[1])))


@torch.no_grad()
def w_average(generator: nn.Module, facts: StyleGANFacts) -> tuple[list[float], str]:
    w_avg = getattr(generator.mapping, "w_avg", None)
    if isinstance(w_avg, torch.Tensor) and tuple(w_avg.shape) == (facts.w_dim,) and bool(w_avg.abs().sum() > 0):
        return w_avg.float().tolist(), "mapping.w_avg"
    gen = torch.Generator().manual_seed(DIRECTION_SEED)
    z = torch.randn(W_AVG_SAMPLES, facts.z_dim, generator=gen)
    c = _one_hot(torch.arange(W_AVG_SAMPLES) % facts.c_dim, facts.c_dim) if facts.c_dim else None
    return MappingGraph(generator)(z, c).mean(0).tolist(), f"mean of w over {W_AVG_SAMPLES} seeded z"


def direction_names(generator: nn.Module, c_dim: int) -> list[str]:
    names = getattr(generator, "class_names", None)
    if not (isinstance(names, (list, tuple)) and len(names) == c_dim and len(set(map(str, names))) == c_dim):
        names = range(c_dim)
    return [f"class_{n}" for n in names]


@torch.no_grad()
def class_directions(generator: nn.Module, facts: StyleGANFacts, samples: int = DIRECTION_SAMPLES,
                     seed: int = DIRECTION_SEED) -> dict[str, list[float]]:
    """{"class_<k>": mean w of class k - mean of the class means} (raw, not normalised)."""
    if facts.c_dim == 0:
        return {}
    z = torch.randn(samples, facts.z_dim, generator=torch.Generator().manual_seed(seed))
    graph = MappingGraph(generator)
    means = torch.stack([graph(z, _one_hot(torch.full((samples,), k), facts.c_dim)).mean(0)
                         for k in range(facts.c_dim)])
    diffs = means - means.mean(0, keepdim=True)
    return {name: d.tolist() for name, d in zip(direction_names(generator, facts.c_dim), diffs)}


def _export_component(module: nn.Module, make_inputs, spec: ModelConfigSpec, model_dir: Path,
                      options: ExportOptions) -> float:
    """One graph through the exporter core, traced at TRACE_BATCH and verified at VERIFY_BATCH: its
    max abs error."""
    rng = np.random.default_rng(0)
    example = make_inputs(TRACE_BATCH, rng)
    dynamic = {k: {0: "batch"} for k in example} | {spec.outputs[0].name: {0: "batch"}}
    check = ParityCheck(lambda: make_inputs(VERIFY_BATCH, rng), failed=lambda exc: (
        f"the graph traced at batch {TRACE_BATCH} failed at batch {VERIFY_BATCH}: {type(exc).__name__}: {exc}"))
    profile = None
    if options.tensorrt:
        from export.tensorrt import ShapeRange

        opt, most = min(8, options.max_batch_size), options.max_batch_size
        profile = {t.name: ShapeRange((1, *t.dims), (opt, *t.dims), (most, *t.dims)) for t in spec.inputs}
    result = export_graph(module, spec, example, dynamic, lambda _: [check], model_dir, options, atol=1e-4,
                          tensorrt_profile=profile, export_failed=lambda exc: StyleGANExportError(
                              f"torch.onnx.export failed for {model_dir.name}: {type(exc).__name__}: {exc}"))
    return result.max_abs_error


def export_stylegan(
    generator: nn.Module,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    *,
    output_range: tuple[float, float] = (-1.0, 1.0),
    parameters: Mapping[str, str] | None = None,
    **shared,
) -> StyleGANExportReport:
    """Writes <name>_mapping and <name>_synthesis (graphs verified, configs, w_avg.json, directions.json).
    `options`: the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    options = ExportOptions.given(options, **shared)
    generator.eval()
    facts = probe_stylegan(generator, output_range)
    mapping, synthesis = MappingGraph(generator).eval(), SynthesisGraph(generator).eval()
    repository = Path(repository)
    dirs = {"mapping": repository / f"{name}_mapping", "synthesis": repository / f"{name}_synthesis"}

    def mapping_inputs(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        feeds = {"z": rng.standard_normal((batch, facts.z_dim), dtype=np.float32)}
        if facts.c_dim:
            feeds["c"] = np.eye(facts.c_dim, dtype=np.float32)[rng.integers(0, facts.c_dim, batch)]
        return feeds

    def synthesis_inputs(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        # Realistic ws: rows from the mapping, mixed across two samples at a random crossover.
        with torch.no_grad():
            a, b = (mapping(**{k: torch.from_numpy(v) for k, v in mapping_inputs(batch, rng).items()})
                    for _ in range(2))
        cut = int(rng.integers(0, facts.num_ws + 1))
        ws = torch.cat([a[:, None].expand(-1, cut, -1), b[:, None].expand(-1, facts.num_ws - cut, -1)], dim=1)
        return {"ws": ws.contiguous().numpy()}

    common = {
        "genserve.pipeline": "stylegan",
        "genserve.pipeline_name": name,
        **facts.to_parameters(),
        **(parameters or {}),
    }
    mapping_in = [TensorSpec("z", "float32", (facts.z_dim,))]
    if facts.c_dim:
        mapping_in.append(TensorSpec("c", "float32", (facts.c_dim,)))
    specs = {
        "mapping": (mapping_in, [TensorSpec("w", "float32", (facts.w_dim,))]),
        "synthesis": ([TensorSpec("ws", "float32", (facts.num_ws, facts.w_dim))],
                      [TensorSpec("image", "float32", (facts.image_channels, facts.image_height,
                                                       facts.image_width))]),
    }
    modules = {"mapping": (mapping, mapping_inputs), "synthesis": (synthesis, synthesis_inputs)}
    errors = {}
    for component, (inputs, outputs) in specs.items():
        spec = ModelConfigSpec(
            name=dirs[component].name, inputs=inputs, outputs=outputs,
            batching=default_batching(options.max_batch_size, max_queue_delay_microseconds=2000),
            target=options.target, parameters={**common, "genserve.component": component})
        errors[component] = _export_component(*modules[component], spec, dirs[component], options)

    w_avg, source = w_average(generator, facts)
    (dirs["mapping"] / "w_avg.json").write_text(json.dumps({"w_avg": w_avg, "source": source}) + "\n")
    directions = class_directions(generator, facts)
    (dirs["mapping"] / "directions.json").write_text(json.dumps({
        "directions": directions,
        "definition": (f"class_<k>: mean of w over {DIRECTION_SAMPLES} z (seed {DIRECTION_SEED}) for class k "
                       "minus the mean of the class means; raw, not unit length: w + 1.0 * d moves the "
                       "global mean w to the class mean") if directions else "unconditional: no directions",
    }) + "\n")
    log.debug("exported %s mapping/synthesis (max abs errors %s)", name, errors)
    return StyleGANExportReport(dirs["mapping"], dirs["synthesis"], errors, facts)


def export_stylegan_module(
    module: str,
    weights: str | Path,
    repository: Path,
    name: str,
    init_args: Mapping[str, Any] | None = None,
    options: ExportOptions | None = None,
    *,
    state_dict_key: str | None = None,
    **shared,
) -> StyleGANExportReport:
    """FILE.py:NAME (class or factory, built with **init_args) + a weight file as export.weights reads
    it (`state_dict_key` picks the state dict in it, e.g. rosinality's 'g_ema'). `options`: the shared
    arguments (export.core.ExportOptions), or any of them as keywords."""
    if init_args is not None and not isinstance(init_args, Mapping):
        raise StyleGANExportError(f"--init-args must be a JSON object of keyword arguments, got {init_args!r}")
    file, attr = parse_module_ref(module)
    state = read_state_dict(weights, state_dict_key)  # no code of the file runs: before running the user's code
    generator = build_user_generator(module, init_args)
    load_weights(generator, state, f"--weights {str(weights)!r}")
    provenance = {"genserve.source_sha256": sha256(Path(weights)), "genserve.source_module": f"{file.name}:{attr}"}
    return export_stylegan(generator.eval(), repository, name, ExportOptions.given(options, **shared),
                           parameters=provenance)


def export_stylegan_checkpoint(
    checkpoint: str | Path,
    repository: Path,
    name: str,
    options: ExportOptions | None = None,
    **shared,
) -> StyleGANExportReport:
    """A zoo StyleGAN checkpoint (<stem>.json + <stem>.safetensors), e.g. zoo/checkpoints/stylegan_digits.
    `options`: the shared arguments (export.core.ExportOptions), or any of them as keywords."""
    from zoo.stylegan.model import load_stylegan

    stem = Path(checkpoint)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
    generator = load_stylegan(stem)
    return export_stylegan(generator, repository, name, ExportOptions.given(options, **shared),
                           parameters={"genserve.source_sha256": sha256(stem.with_suffix(".safetensors"))})
