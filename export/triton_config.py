"""Triton `config.pbtxt` generation with Triton's own protobuf schema.

Configs are built as `inference.ModelConfig` messages (the proto tritonclient ships)
and printed with protobuf's text format, so every file we write is one Triton parses.
The same config loads in the NGC Triton image (native onnxruntime backend) and on the
local CPU Triton (a Python-based backend registered under the name "onnxruntime").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.contract import CONTRACT_VERSION, VERSION_KEY

# numpy dtype name -> Triton data type
TRITON_DTYPES = {
    "bool": mc.TYPE_BOOL,
    "uint8": mc.TYPE_UINT8,
    "int32": mc.TYPE_INT32,
    "int64": mc.TYPE_INT64,
    "float16": mc.TYPE_FP16,
    "float32": mc.TYPE_FP32,
    "float64": mc.TYPE_FP64,
}


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output; `dims` exclude the batch axis (-1 = dynamic)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    # A per-sample scalar under max_batch_size > 0 travels as dims [1] and is reshaped
    # to [] for the graph, which then sees shape [batch].
    reshape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BatchingPolicy:
    """How Triton groups requests for one model."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0


@dataclass(frozen=True)
class DeploymentTarget:
    """Where the model runs: instance kind and count."""

    kind: str = "cpu"  # "cpu" or "gpu"
    instance_count: int = 1
    # Precision of the TensorRT accelerator ONNX Runtime uses on GPUs ("fp16" or "fp32").
    precision: str = "fp16"

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"target kind must be 'cpu' or 'gpu', got {self.kind!r}")
        if self.instance_count < 1:
            raise ValueError("instance_count must be >= 1")
        if self.precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be 'fp16' or 'fp32', got {self.precision!r}")


@dataclass
class ModelConfigSpec:
    name: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    batching: BatchingPolicy
    target: DeploymentTarget = field(default_factory=DeploymentTarget)
    backend: str = "onnxruntime"
    platform: str = ""  # "tensorrt_plan" for TensorRT engines (then no backend is named)
    # Pipeline metadata the services read (latent size, classes, ...; services.contract). Triton
    # keeps these in the model config and serves them back through its config API.
    parameters: Mapping[str, str] = field(default_factory=dict)
    versions_to_serve: int = 1
    # Per-sample shapes for the warm-up request where dims are dynamic (-1); a graph
    # such as a U-Net cannot run at the 1x1 a dynamic axis would otherwise get.
    warmup_dims: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # Triton's dynamic batcher merges requests of equal shapes; off for graphs whose rows must
    # not be merged blindly (FLUX's transformer takes one set of position ids per call).
    dynamic_batching: bool = True


def default_batching(max_batch_size: int, max_queue_delay_microseconds: int) -> BatchingPolicy:
    """Preferred sizes are the powers of two from 4 to the maximum: batches the
    runtime's kernels handle well, without making Triton wait for odd sizes."""
    sizes, size = [], 4
    while size <= max_batch_size:
        sizes.append(size)
        size *= 2
    if max_batch_size not in sizes and max_batch_size > 1:
        sizes.append(max_batch_size)
    return BatchingPolicy(max_batch_size, tuple(sizes), max_queue_delay_microseconds)


def _tensor(spec: TensorSpec, message):
    if spec.dtype not in TRITON_DTYPES:
        raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype!r} has no Triton type")
    message.name = spec.name
    message.data_type = TRITON_DTYPES[spec.dtype]
    message.dims.extend(spec.dims)
    if spec.reshape is not None:
        message.reshape.shape.extend(spec.reshape)
        if not spec.reshape:
            # An empty shape list is the scalar reshape; make it present in the message.
            message.reshape.SetInParent()


def build_model_config(spec: ModelConfigSpec) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name)
    if spec.platform:
        config.platform = spec.platform
    else:
        config.backend = spec.backend
    config.max_batch_size = spec.batching.max_batch_size
    config.version_policy.latest.num_versions = spec.versions_to_serve
    for t in spec.inputs:
        _tensor(t, config.input.add())
    for t in spec.outputs:
        _tensor(t, config.output.add())
    if spec.batching.max_batch_size > 0 and spec.dynamic_batching:
        dyn = config.dynamic_batching
        dyn.SetInParent()
        dyn.preferred_batch_size.extend(spec.batching.preferred_batch_sizes)
        dyn.max_queue_delay_microseconds = spec.batching.max_queue_delay_microseconds
    group = config.instance_group.add()
    group.count = spec.target.instance_count
    group.kind = mc.ModelInstanceGroup.KIND_GPU if spec.target.kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    if spec.target.kind == "gpu" and not spec.platform and spec.backend == "onnxruntime":
        _add_tensorrt_accelerator(config, spec.target.precision)
    for key, value in spec.parameters.items():
        config.parameters[key].string_value = str(value)
    # Every config says which contract it was written to, so a reader never misreads a newer one.
    config.parameters[VERSION_KEY].string_value = str(CONTRACT_VERSION)
    _add_zero_warmup(config, spec)
    return config


def _add_tensorrt_accelerator(config: mc.ModelConfig, precision: str) -> None:
    """On GPUs, Triton's ONNX Runtime backend hands supported subgraphs to TensorRT
    (falling back to CUDA for the rest) and caches the engines it builds, so a restart
    does not rebuild them."""
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    accelerator.parameters["precision_mode"] = precision.upper()
    accelerator.parameters["max_workspace_size_bytes"] = str(4 * 1024**3)
    accelerator.parameters["trt_engine_cache_enable"] = "1"
    accelerator.parameters["trt_engine_cache_path"] = "/tmp/genserve-trt-cache"


def _add_zero_warmup(config: mc.ModelConfig, spec: ModelConfigSpec) -> None:
    """One batch-1 request of zeros at load time, so the first real request does not
    pay for lazy initialisation. Zeros are valid for every input (class 0, zero latent)."""
    warmup = config.model_warmup.add(name="zeros_batch1", batch_size=1)
    for t in spec.inputs:
        item = warmup.inputs[t.name]
        item.data_type = TRITON_DTYPES[t.dtype]
        item.dims.extend(spec.warmup_dims.get(t.name) or [d if d > 0 else 1 for d in t.dims])
        item.zero_data = True


def config_to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def write_model_config(config: mc.ModelConfig, model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(config_to_text(config))
    return path
