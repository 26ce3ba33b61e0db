"""Inference backends over one model repository: embedded ONNX Runtime or Triton."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.config import Settings
from services.runtime.base import InferenceBackend
from services.runtime.repository import ModelRepository, ModelSpec, RepositoryError

if TYPE_CHECKING:
    from services.metrics import ServiceMetrics

__all__ = ["InferenceBackend", "ModelRepository", "ModelSpec", "RepositoryError", "create_backend"]


def create_backend(settings: Settings, metrics: ServiceMetrics | None = None) -> InferenceBackend:
    """`metrics`: where the Triton backend counts its transports (None: nowhere)."""
    if settings.backend == "onnxruntime":
        from services.families import names
        from services.runtime.batching import AdaptiveBatcher
        from services.runtime.onnxruntime_backend import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(
            ModelRepository(settings.model_repository),
            intra_op_threads=settings.ort.intra_op_threads,
            inter_op_threads=settings.ort.inter_op_threads,
            inline_max_s=settings.ort.inline_ms / 1000,
            allow_spinning=settings.ort.allow_spinning,
            shared_threads=settings.ort.thread_pool == "shared",
            alone_inline_max_s=settings.ort.alone_inline_ms / 1000,
        )
        # Single-pass models get request merging here; Triton's dynamic batcher does it there.
        single_pass = {name for name, spec in backend.models().items()
                       if spec.parameters.get("genserve.pipeline") in names(single_pass=True)}
        return AdaptiveBatcher(backend, single_pass, settings.ort.batch_wait_ms / 1000)
    if settings.backend == "triton":
        from services.runtime.triton_backend import TritonBackend

        return TritonBackend(ModelRepository(settings.model_repository), settings.triton.url,
                             settings.triton.timeout_s, shared_memory=settings.triton.shared_memory,
                             metrics=metrics)
    raise ValueError(f"unknown backend {settings.backend!r}")
