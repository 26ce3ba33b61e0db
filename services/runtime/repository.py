"""Reads a Triton model repository: `<model>/config.pbtxt` + `<model>/<version>/model.onnx`.

The repository is the contract between export/ and both backends (design principle 1):
the embedded backend reads these configs exactly as Triton would (version policy,
batching limit, reshape of per-sample scalars), so a pipeline cannot tell them apart.

A model whose config says `genserve.adapter_slots_of: <model>` is that model's graph with
LoRA adapter slots as Triton serves it (`python -m export lora-slots`, services.adapters):
not a model of its own to pipelines, it is listed in `adapter_slots` under the model it serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.contract import VERSION_KEY, ContractError, contract_version

SLOTS_OF_KEY = "genserve.adapter_slots_of"

# Triton data type -> numpy dtype
NUMPY_DTYPES = {
    mc.TYPE_BOOL: np.dtype(np.bool_),
    mc.TYPE_UINT8: np.dtype(np.uint8),
    mc.TYPE_INT32: np.dtype(np.int32),
    mc.TYPE_INT64: np.dtype(np.int64),
    mc.TYPE_FP16: np.dtype(np.float16),
    mc.TYPE_FP32: np.dtype(np.float32),
    mc.TYPE_FP64: np.dtype(np.float64),
}

MODEL_FILES = ("model.onnx", "model.plan")


class RepositoryError(RuntimeError):
    """The repository is missing or a model in it is malformed."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # per sample, without the batch axis; -1 = any
    reshape: tuple[int, ...] | None = None  # per-sample shape the graph sees


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    parameters: dict[str, str] = field(default_factory=dict)  # genserve.* (services.contract), less the version
    model_file: Path | None = None  # the served version's graph, when read from disk
    model_dir: Path | None = None  # holds config.pbtxt and pipeline files (tokenizer, ...)
    contract_version: int = 1  # the genserve.* contract its config was written to

    def file(self, name: str) -> Path:
        """A file its pipeline reads beside config.pbtxt (tokenizer.json, scheduler_config.json, ...)."""
        if self.model_dir is None:
            raise ValueError(f"model {self.name!r} was not read from a repository folder, so it has no {name}")
        return self.model_dir / name

    def input(self, name: str) -> TensorInfo:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)


def parse_model_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _tensors(items) -> tuple[TensorInfo, ...]:
    out = []
    for t in items:
        if t.data_type not in NUMPY_DTYPES:
            raise RepositoryError(f"tensor {t.name!r}: unsupported data type {t.data_type}")
        reshape = tuple(t.reshape.shape) if t.HasField("reshape") else None
        out.append(TensorInfo(t.name, NUMPY_DTYPES[t.data_type], tuple(t.dims), reshape))
    return tuple(out)


def spec_from_config(
    config: mc.ModelConfig, version: str, model_file: Path | None = None, model_dir: Path | None = None
) -> ModelSpec:
    """Refuses (ContractError) a config of a contract version this code does not read."""
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    return ModelSpec(
        name=config.name,
        version=version,
        max_batch_size=config.max_batch_size,
        inputs=_tensors(config.input),
        outputs=_tensors(config.output),
        parameters={k: v for k, v in parameters.items() if k != VERSION_KEY},
        model_file=model_file,
        model_dir=model_dir,
        contract_version=contract_version(parameters, config.name),
    )


def _served_versions(model_dir: Path, config: mc.ModelConfig) -> list[str]:
    """The versions Triton would load under the config's version policy."""
    available = sorted(
        (int(p.name) for p in model_dir.iterdir()
         if p.is_dir() and p.name.isdigit() and any((p / f).exists() for f in MODEL_FILES)),
    )
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        chosen = available
    elif which == "specific":
        chosen = [v for v in available if v in set(policy.specific.versions)]
    else:  # "latest" (Triton's default, one version)
        n = policy.latest.num_versions if which == "latest" else 1
        chosen = available[-n:]
    return [str(v) for v in chosen]


class ModelRepository:
    """The models of one repository directory, each at its newest served version."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(
                f"model repository {self.root} does not exist: build it with `make model-repository`"
            )
        self.models: dict[str, ModelSpec] = {}
        self.adapter_slots: dict[str, ModelSpec] = {}  # model -> its slotted graph's model, for Triton
        slotted: dict[str, ModelSpec] = {}
        for config_path in sorted(self.root.glob("*/config.pbtxt")):
            model_dir = config_path.parent
            try:
                config = parse_model_config(config_path.read_text())
            except text_format.ParseError as exc:
                raise RepositoryError(f"{config_path}: {exc}") from exc
            if config.name and config.name != model_dir.name:
                raise RepositoryError(
                    f"{config_path}: name {config.name!r} differs from its folder {model_dir.name!r}"
                )
            config.name = model_dir.name
            versions = _served_versions(model_dir, config)
            if not versions:
                raise RepositoryError(f"{model_dir}: no version folder with {' or '.join(MODEL_FILES)}")
            newest = versions[-1]
            model_file = next(model_dir / newest / f for f in MODEL_FILES if (model_dir / newest / f).exists())
            try:
                spec = spec_from_config(config, newest, model_file, model_dir)
            except ContractError as exc:
                raise RepositoryError(f"{config_path}: {exc}") from exc
            if SLOTS_OF_KEY in spec.parameters:
                slotted[spec.parameters[SLOTS_OF_KEY]] = spec
            else:
                self.models[model_dir.name] = spec
        for of, spec in slotted.items():
            if of not in self.models:
                raise RepositoryError(f"{spec.model_dir}: the adapter-slot graph of {of!r}, which the repository "
                                      f"does not hold: remove it or export {of!r} again")
            self.adapter_slots[of] = spec

    def __contains__(self, name: str) -> bool:
        return name in self.models

    def __getitem__(self, name: str) -> ModelSpec:
        return self.models[name]
