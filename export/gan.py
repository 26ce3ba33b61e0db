"""Export a GAN generator checkpoint into a Triton model directory.

Graph contract (what services/pipelines/pipeline_gan.py relies on):
  inputs   z            FP32 [batch, latent_dim]   latent, already truncated by the caller
           class_label  INT64 [batch, 1] -> [batch] (conditional models only)
  outputs  image        FP32 [batch, C, H, W]      in [-1, 1]
The generator's shape facts travel in the config's `parameters`, so a service learns
them from the repository alone (embedded) or from Triton's config API (Triton).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.onnx_export import export_onnx, verify_onnx
from export.triton_config import (
    DeploymentTarget,
    ModelConfigSpec,
    TensorSpec,
    build_model_config,
    default_batching,
    write_model_config,
)

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    model_dir: Path
    onnx_path: Path
    max_abs_error: float


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_gan(
    checkpoint: str | Path,
    repository: Path,
    name: str,
    version: int = 1,
    max_batch_size: int = 16,
    target: DeploymentTarget = DeploymentTarget(),
    atol: float = 1e-4,
    tensorrt: bool = False,
) -> ExportReport:
    from zoo.checkpoint import _stem, load_checkpoint

    # 1. Load the generator.
    generator = load_checkpoint(checkpoint)
    conditional = generator.num_classes > 0
    latent_dim = generator.latent_dim

    # 2. Export with a dynamic batch axis (traced at batch 2, verified at batch 5).
    def inputs(batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        feeds = {"z": rng.standard_normal((batch, latent_dim), dtype=np.float32)}
        if conditional:
            feeds["class_label"] = rng.integers(0, generator.num_classes, batch).astype(np.int64)
        return feeds

    rng = np.random.default_rng(0)
    model_dir = repository / name
    onnx_path = model_dir / str(version) / "model.onnx"
    example = {k: torch.from_numpy(v) for k, v in inputs(2, rng).items()}
    dynamic = {k: {0: "batch"} for k in example} | {"image": {0: "batch"}}
    export_onnx(generator, example, ["image"], onnx_path, dynamic)

    # 3. Verify ONNX Runtime against PyTorch on fresh inputs of another batch size.
    max_err = verify_onnx(generator, onnx_path, inputs(5, rng), atol=atol)

    # 4. Write the Triton config beside the version folder.
    tensor_inputs = [TensorSpec("z", "float32", (latent_dim,))]
    if conditional:
        tensor_inputs.append(TensorSpec("class_label", "int64", (1,), reshape=()))
    c, s = generator.image_channels, generator.image_size
    spec = ModelConfigSpec(
        name=name,
        inputs=tensor_inputs,
        outputs=[TensorSpec("image", "float32", (c, s, s))],
        # A GAN forward pass takes milliseconds: wait at most 2 ms to form a batch.
        batching=default_batching(max_batch_size, max_queue_delay_microseconds=2000),
        target=target,
        parameters={
            "genserve.pipeline": "gan",
            "genserve.latent_dim": str(latent_dim),
            "genserve.num_classes": str(generator.num_classes),
            "genserve.image_channels": str(c),
            "genserve.image_size": str(s),
            "genserve.output_range": "-1,1",
            "genserve.source_sha256": _sha256(_stem(checkpoint).with_suffix(".safetensors")),
        },
    )
    if tensorrt:  # 5. A TensorRT plan beside the ONNX graph, served by Triton's TensorRT platform.
        from export.tensorrt import build_plan, gan_profile, tensorrt_config

        plan = build_plan(onnx_path, gan_profile(latent_dim, conditional, max_batch_size), "fp16")
        shutil.copy(plan, onnx_path.with_name("model.plan"))
        spec = tensorrt_config(spec, target.instance_count)
    write_model_config(build_model_config(spec), model_dir)
    log.debug("exported %s v%d (max abs error %.2e)", name, version, max_err)
    return ExportReport(model_dir, onnx_path, max_err)
