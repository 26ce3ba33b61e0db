"""One exporter core: a PyTorch module in, a verified graph and its Triton config out.

Every family (export/<family>.py) loads its checkpoint, wraps each model under its graph
contract and describes the graph (inputs, outputs, config parameters); the rest is the same
job for all of them, done here once:

  1. trace the module at example inputs (TorchScript; torch.export with `dynamo`)
  2. weights past protobuf's 2 GB into model.onnx_data; fp16 when the options ask for it
  3. verify ONNX Runtime against PyTorch, one check at a time (export.verification plans the
     checks of a diffusers component from its activation memory)
  4. a TensorRT plan beside the graph when a profile is given (export.tensorrt)
  5. config.pbtxt, and the files the serving pipeline reads beside it

`ExportOptions` holds the arguments every family's exporter takes; `GraphExporter` is the core
as the multi-graph pipelines use it (one call per component, a report each).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.errors import ParityError, UnsupportedFolder
from export.onnx_export import export_onnx, verify_onnx
from export.staging import measured
from export.triton_config import (
    DeploymentTarget,
    ModelConfigSpec,
    build_model_config,
    default_batching,
    write_model_config,
)
from export.verification import (
    ActivationModel,
    Check,
    GraphOptions,
    describe_checks,
    plan_checks,
    verification_budget,
)
from services.engine.memory import ACTIVATION_BYTES_PARAMETER

# Protobuf's hard limit; graphs past it keep their weights in an external file.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
EXTERNAL_DATA_FILE = "model.onnx_data"
# The denoiser's calls come from the step engine, which already batches every request of a
# shape into one call per iteration: Triton waiting for more rows only adds latency (measured:
# 1.3 ms of queue per 4.7 ms U-Net call with 1000 us). At 0 it still merges what queues up
# while an instance is busy (several service replicas sharing one Triton).
DENOISER_QUEUE_DELAY_US = 0
# fp16 graphs against the fp32 module: half precision's ~1e-3 relative rounding, compounded
# over a deep network (measured on random U-Nets: 2e-3 on outputs of magnitude ~1).
FP16_ATOL = FP16_RTOL = 3e-2


@dataclass(frozen=True)
class ExportOptions:
    """The arguments every family's exporter shares: the model version folder, the batch Triton
    forms, where instances run, whether TensorRT plans are built (families without plans ignore
    it), where progress lines go, how graphs are written and checked (GraphOptions), and the
    size past which weights go to model.onnx_data."""

    version: int = 1
    max_batch_size: int = 16
    target: DeploymentTarget = DeploymentTarget()
    tensorrt: bool = False
    progress: Callable[[str], None] = print
    graphs: GraphOptions = GraphOptions()
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD

    @classmethod
    def given(cls, options: ExportOptions | None = None, **changes) -> ExportOptions:
        """`options` (default: the defaults) with the fields named in `changes` replaced, so an
        exporter takes `options` or the single keywords (`progress=...`) callers pass."""
        return replace(options or cls(), **changes)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, *, sizes: bool = True, batch_help: str | None = None) -> None:
        """The flags of `python -m export <command>` that `from_args` reads (the graph options'
        --verify/--dtype are the folder commands' own); `sizes`: --version and --max-batch-size too."""
        if sizes:
            parser.add_argument("--version", type=int, default=1)
            parser.add_argument("--max-batch-size", type=int, default=16, help=batch_help)
        parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                            help="Triton model repository to write into (default: model_repository)")
        parser.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                            help="instance kind in the generated configs (default: cpu)")
        parser.add_argument("--instances", type=int, default=1, help="instances per model (default: 1)")
        parser.add_argument("--tensorrt", action="store_true",
                            help="also build TensorRT plans (needs an NVIDIA GPU and the tensorrt package) and "
                                 "write platform: tensorrt_plan configs")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportOptions:
        """The options a parsed command line asks for (defaults for the flags its command lacks)."""
        memory = getattr(args, "verify_memory", None)
        graphs = GraphOptions(verify=getattr(args, "verify", "full"), dtype=getattr(args, "dtype", "fp32"),
                              verify_memory=None if memory is None else int(memory * 2**30))
        return cls(version=getattr(args, "version", 1), max_batch_size=getattr(args, "max_batch_size", 16),
                   target=DeploymentTarget(args.target, args.instances), tensorrt=args.tensorrt, graphs=graphs)


@dataclass(frozen=True)
class ParityCheck:
    """One comparison of the graph with PyTorch. `feeds` draws its inputs when the check runs (one
    check's inputs in memory at a time); `describe` is its progress line (none when empty);
    `failed(exc)` explains an ONNX Runtime failure that is no mismatch (a size or batch baked into
    the graph), raised as a ParityError; without it such a failure passes through as it is."""

    feeds: Callable[[], Mapping[str, np.ndarray]]
    describe: str = ""
    failed: Callable[[Exception], str] | None = None


@dataclass
class GraphResult:
    model_dir: Path
    onnx_path: Path
    max_abs_error: float
    external_data: bool


def export_graph(
    module: torch.nn.Module,
    spec: ModelConfigSpec,
    example: Mapping[str, np.ndarray],
    dynamic: Mapping[str, Mapping[int, str]],
    checks: Callable[[int], Sequence[ParityCheck]],
    model_dir: Path,
    options: ExportOptions,
    *,
    atol: float,
    dtype: str = "fp32",
    dynamo: bool = False,
    tensorrt_profile=None,
    tensorrt_precision: str = "fp16",
    files: Sequence[tuple[Path, str]] = (),
    export_failed: Callable[[Exception], Exception] | None = None,
    progress: Callable[[str], None] = lambda _: None,
    label: str = "",
) -> GraphResult:
    """Writes `module` (eval mode, called with the inputs by name) as `model_dir/<version>/model.onnx`,
    traced at `example` with `dynamic` axes, verified by `checks(weight_bytes)`, then its config
    `spec` (with a TensorRT plan when `tensorrt_profile` is given) and `files` ((source, name)
    pairs) beside it. `export_failed` turns an exporter error into the family's own; `progress`
    hears the steps that take long, which name the graph `label` (default: the config's name)."""
    label = label or spec.name
    onnx_path = model_dir / str(options.version) / "model.onnx"
    weight_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    threshold = options.external_data_threshold
    # 1. Trace.
    try:
        export_onnx(module, {k: torch.from_numpy(v) for k, v in example.items()}, [t.name for t in spec.outputs],
                    onnx_path, dynamic, dynamo=dynamo, large=weight_bytes >= threshold)
    except Exception as exc:  # unsupported op, data-dependent control flow, ...
        if export_failed is None:
            raise
        raise export_failed(exc) from exc
    # 2. Where the weights live, and in which precision.
    external = save_with_external_data_if_large(onnx_path, threshold)
    rtol = None
    if dtype == "fp16":
        progress(f"converting {label} to fp16 (inputs and outputs stay fp32) ...")
        external = convert_to_fp16(onnx_path, weight_bytes // 2 >= threshold)
        atol, rtol = max(atol, FP16_ATOL), FP16_RTOL
    # 3. Verify against PyTorch.
    err = 0.0
    for check in checks(weight_bytes):
        if check.describe:
            progress(f"verifying {label}: {check.describe}")
        err = max(err, run_check(module, onnx_path, check, atol, rtol))
    # 4. A plan beside the graph, served by Triton's TensorRT platform.
    if tensorrt_profile is not None:
        from export.tensorrt import build_plan, tensorrt_config

        progress(f"building TensorRT plan for {label} ({tensorrt_precision}) ...")
        shutil.copy(build_plan(onnx_path, tensorrt_profile, tensorrt_precision), onnx_path.with_name("model.plan"))
        spec = tensorrt_config(spec, options.target.instance_count, tensorrt_profile)
    # 5. The config and what the pipeline reads beside it.
    write_model_config(build_model_config(spec), model_dir)
    for src, dst in files:
        shutil.copy(src, model_dir / dst)
    return GraphResult(model_dir, onnx_path, err, external)


def run_check(module: torch.nn.Module, onnx_path: Path, check: ParityCheck, atol: float,
              rtol: float | None = None) -> float:
    """The check's max abs error (export.onnx_export.verify_onnx; ParityError past the tolerance)."""
    try:
        return verify_onnx(module, onnx_path, check.feeds(), atol=atol, **({"rtol": rtol} if rtol else {}))
    except ParityError:
        raise
    except Exception as exc:
        if check.failed is None:
            raise
        raise ParityError(f"{onnx_path}: {check.failed(exc)}") from exc


@dataclass
class ComponentReport:
    name: str
    onnx_path: Path
    max_abs_error: float
    external_data: bool
    verified: str = ""  # the checks that ran (batch, size, activation estimate), or why none did
    wall_s: float = 0.0
    peak_rss_bytes: int = 0


class GraphExporter:
    """Exports one pipeline's graphs into the repository, one call per component.

    Each call traces the module at batch 2 and the native size (`make_inputs(2, native)`, where
    `make_inputs(batch, grid)` builds the inputs for a grid of the component's `activation` model,
    None for a component without spatial axes), then verifies the graph in ONNX Runtime against
    PyTorch with the checks export.verification plans from the component's activation memory
    and the machine's available memory (`verify`: full | small | off; `verify_memory`: a fixed
    activation budget in bytes instead). It writes `<name>_<role>/config.pbtxt` with dynamic
    batching, a warm-up request at the native size (`make_inputs(1, native)`) and the parameters
    `genserve.pipeline`, `genserve.pipeline_name`, `genserve.component` plus `parameters` (the
    role's services.contract facts, `to_parameters()`, and any records), and copies `files`
    ((src, name) pairs) beside the config. Reports
    (what was verified, wall time, peak RSS) collect in `.reports`.
    """

    def __init__(self, repository: Path, name: str, pipeline: str, options: ExportOptions = ExportOptions()):
        self.repository, self.name, self.options = Path(repository), name, options
        self.base = {"genserve.pipeline": pipeline, "genserve.pipeline_name": name}
        self.reports: list[ComponentReport] = []

    def model_dir(self, role: str) -> Path:
        return self.repository / f"{self.name}_{role}"

    def __call__(self, role, module, make_inputs, inputs, outputs, dynamic, parameters, atol, delay_us, files=(),
                 tensorrt_profile=None, tensorrt_precision: str | None = None, dynamo: bool = False,
                 dynamic_batching: bool = True, activation: ActivationModel = ActivationModel(),
                 precision: str | None = None) -> Path:
        """`precision`: this graph's dtype when it must differ from the options' (a VAE that
        overflows in fp16 stays "fp32")."""
        options, dtype = self.options, precision or self.options.graphs.dtype
        model_dir, say = self.model_dir(role), self._progress
        with measured() as cost:
            # warm up at the native size
            native = {k: v.shape[1:] for k, v in make_inputs(1, activation.native).items()}
            say(f"exporting {role} ...")
            spec = ModelConfigSpec(
                name=f"{self.name}_{role}", inputs=inputs, outputs=outputs,
                batching=default_batching(options.max_batch_size, delay_us), target=options.target,
                parameters={**self.base, "genserve.component": role,
                            **parameters, **activation_parameter(activation),
                            "genserve.precision": dtype},
                warmup_dims={t.name: tuple(native[t.name]) for t in inputs if t.reshape is None},
                dynamic_batching=dynamic_batching,
            )
            skipped: list[str] = []
            planned: list[Check] = []

            def checks(weight_bytes: int) -> list[ParityCheck]:
                budget = options.graphs.verify_memory
                plan = plan_checks(activation, options.graphs.verify,
                                   verification_budget(weight_bytes) if budget is None else budget)
                planned.extend(plan.checks)
                skipped.extend(plan.skipped)
                return [ParityCheck(partial(make_inputs, c.batch, c.grid), c.describe()) for c in plan.checks]

            if tensorrt_profile is not None:
                from export.tensorrt import precision_for

                tensorrt_precision = tensorrt_precision or precision_for(role)
            result = export_graph(
                module, spec, make_inputs(2, activation.native), dynamic, checks, model_dir, options, atol=atol,
                dtype=dtype, dynamo=dynamo, tensorrt_profile=tensorrt_profile,
                tensorrt_precision=tensorrt_precision or "fp16", files=files,
                progress=say, label=role)
        done = f"verified {describe_checks(planned)}, max abs error {result.max_abs_error:.2e}" if planned else ""
        skip = f"not verified: {'; '.join(skipped)}" if skipped else ""
        verified = "; ".join(x for x in (done, skip) if x)
        say(f"{role}: {verified}; {cost.wall_s:.1f} s, peak RSS "
            f"{cost.peak_rss_bytes / 2**30:.2f} GiB{' (external data)' if result.external_data else ''}")
        self.reports.append(ComponentReport(spec.name, result.onnx_path, result.max_abs_error, result.external_data,
                                            verified, cost.wall_s, cost.peak_rss_bytes))
        return model_dir

    def _progress(self, line: str) -> None:
        self.options.progress(f"[{self.name}] {line}")


def activation_parameter(activation: ActivationModel) -> dict[str, str]:
    """The activation memory of one row at the native size, for a graph with spatial axes: the
    serving engine bounds its rows per call by it (services/engine/memory.py)."""
    if activation.native is None:
        return {}
    return {ACTIVATION_BYTES_PARAMETER: str(activation.row_bytes(activation.native))}


def save_with_external_data_if_large(path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> bool:
    """Moves weights into `model.onnx_data` beside the graph when graph and weights together
    pass `threshold` (weights an exporter already wrote elsewhere, such as torch.export's
    `model.onnx.data`, are gathered into it and their old file removed).

    Triton's ONNX Runtime backend and ONNX Runtime itself resolve the external file
    relative to the graph, so the version folder stays self-contained.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    header = onnx.load(str(path), load_external_data=False)
    written = {entry.value for t in _get_all_tensors(header) if uses_external_data(t)
               for entry in t.external_data if entry.key == "location"}
    if path.stat().st_size + sum((path.parent / f).stat().st_size for f in written) < threshold:
        return False
    if len(written) == 1:  # one file already (torch.export's): renamed, never loaded (it can be 48 GB)
        for tensor in _get_all_tensors(header):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = EXTERNAL_DATA_FILE
        (path.parent / written.pop()).rename(path.parent / EXTERNAL_DATA_FILE)
        onnx.save_model(header, str(path))
        return True
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA_FILE, size_threshold=1024)
    for stale in written - {EXTERNAL_DATA_FILE}:
        (path.parent / stale).unlink()
    return True


def convert_to_fp16(path: Path, external: bool) -> bool:
    """Rewrites the graph at `path` in half precision with ONNX Runtime's converter (the one its
    Stable Diffusion tools use), inputs and outputs kept fp32 so the serving contract does not
    change; `external`: the weights go to model.onnx_data (half of a graph past 4 GB). Returns
    whether they did."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path), load_external_data=True)
    stale = {e.value for t in _get_all_tensors(model) if uses_external_data(t) for e in t.external_data
             if e.key == "location"}
    for tensor in _get_all_tensors(model):  # the weights are in memory now
        if uses_external_data(tensor):
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=external)
    del model
    for name in stale:
        (path.parent / name).unlink(missing_ok=True)
    if external:
        onnx.save_model(half, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(half, str(path))
    return external


def sha256(path: str | Path) -> str:
    """The weights' digest, recorded in the config (genserve.source_sha256) as their provenance."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_fp32(cls, path: Path):
    """A diffusers or transformers model in float32, in eval mode, whatever dtype its weights
    were saved in: graphs are exported and verified in fp32 (reduced precision is TensorRT's
    choice, per component), and transformers 5 would otherwise keep a bf16/fp16 checkpoint's
    dtype (FLUX's text encoders ship in bf16).

    Loaded with low_cpu_mem_usage (diffusers, through accelerate; transformers 5 always): the
    module is built without weights and the checkpoint's tensors are placed into it, so a 3.4 GB
    U-Net is not held twice (random initial weights plus the state dict) while it loads."""
    kwargs: dict[str, Any]
    if cls.__module__.startswith("transformers"):
        kwargs = {"dtype": torch.float32}
    else:
        kwargs = {"torch_dtype": torch.float32, "low_cpu_mem_usage": True}
    return cls.from_pretrained(path, local_files_only=True, **kwargs).eval()


def sample_size_hw(sample_size, where: str) -> tuple[int, int]:
    """(height, width) of a diffusers `sample_size`, which diffusers' pipelines take as an int
    (square) or as [height, width]."""
    if isinstance(sample_size, int) and sample_size > 0:
        return sample_size, sample_size
    if (isinstance(sample_size, (list, tuple)) and len(sample_size) == 2
            and all(isinstance(n, int) and n > 0 for n in sample_size)):
        return int(sample_size[0]), int(sample_size[1])
    raise UnsupportedFolder(f"{where}: sample_size {sample_size!r} is neither a positive int nor [height, width]; "
                            f"the native size cannot be read from it (set it in the config.json)")
