"""Inference backends over one model repository: embedded ONNX Runtime or Triton."""

from __future__ import annotations

from services.config import Settings
from services.runtime.base import InferenceBackend
from services.runtime.repository import ModelRepository, ModelSpec, RepositoryError

__all__ = ["InferenceBackend", "ModelRepository", "ModelSpec", "RepositoryError", "create_backend"]


def create_backend(settings: Settings) -> InferenceBackend:
    if settings.backend == "onnxruntime":
        from services.runtime.onnxruntime_backend import OnnxRuntimeBackend

        from services.families import names
        from services.runtime.batching import AdaptiveBatcher

        backend = OnnxRuntimeBackend(
            ModelRepository(settings.model_repository),
            intra_op_threads=settings.ort_intra_op_threads,
            inter_op_threads=settings.ort_inter_op_threads,
            inline_max_s=settings.ort_inline_ms / 1000,
            allow_spinning=settings.ort_allow_spinning,
            shared_threads=settings.ort_thread_pool == "shared",
            alone_inline_max_s=settings.ort_alone_inline_ms / 1000,
        )
        # Single-pass models get request merging here; Triton's dynamic batcher does it there.
        single_pass = {name for name, spec in backend.models().items()
                       if spec.parameters.get("genserve.pipeline") in names(single_pass=True)}
        return AdaptiveBatcher(backend, single_pass, settings.batch_wait_ms / 1000)
    if settings.backend == "triton":
        from services.metrics import service_metrics
        from services.runtime.triton_backend import TritonBackend

        return TritonBackend(ModelRepository(settings.model_repository), settings.triton_url,
                             settings.triton_timeout_s, shared_memory=settings.triton_shared_memory,
                             metrics=service_metrics())
    raise ValueError(f"unknown backend {settings.backend!r}")
