"""Service settings, read once from `GENSERVE_*` environment variables.

Every variable is documented in the README's configuration table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("onnxruntime", "triton")


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    backend: str = "onnxruntime"
    model_repository: Path = Path("model_repository")
    triton_url: str = "localhost:8001"  # gRPC
    triton_timeout_s: int = 60
    # ONNX Runtime threads per session; 0 lets ONNX Runtime pick (all cores).
    ort_intra_op_threads: int = 0
    ort_inter_op_threads: int = 0
    default_gan_model: str = "cgan_digits"
    default_diffusion_model: str = "sd_digits"
    # Engine: back-pressure bound (denoising steps x images still to run), deadlines.
    max_queued_steps: int = 4000
    request_timeout_s: int = 120
    max_request_timeout_s: int = 600
    prompt_cache_size: int = 1024
    # Adaptive batching of single-pass models (GAN, VAE) on the embedded backend.
    batch_wait_ms: int = 2

    @classmethod
    def from_env(cls) -> "Settings":
        backend = os.environ.get("GENSERVE_BACKEND", cls.backend).strip().lower()
        if backend not in BACKENDS:
            raise ValueError(f"GENSERVE_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
        return cls(
            backend=backend,
            model_repository=Path(os.environ.get("GENSERVE_MODEL_REPOSITORY", str(cls.model_repository))),
            triton_url=os.environ.get("GENSERVE_TRITON_URL", cls.triton_url),
            triton_timeout_s=_int("GENSERVE_TRITON_TIMEOUT_S", cls.triton_timeout_s, minimum=1),
            ort_intra_op_threads=_int("GENSERVE_ORT_INTRA_OP_THREADS", cls.ort_intra_op_threads),
            ort_inter_op_threads=_int("GENSERVE_ORT_INTER_OP_THREADS", cls.ort_inter_op_threads),
            default_gan_model=os.environ.get("GENSERVE_DEFAULT_GAN_MODEL", cls.default_gan_model),
            default_diffusion_model=os.environ.get("GENSERVE_DEFAULT_DIFFUSION_MODEL", cls.default_diffusion_model),
            max_queued_steps=_int("GENSERVE_MAX_QUEUED_STEPS", cls.max_queued_steps, minimum=1),
            request_timeout_s=_int("GENSERVE_REQUEST_TIMEOUT_S", cls.request_timeout_s, minimum=1),
            max_request_timeout_s=_int("GENSERVE_MAX_REQUEST_TIMEOUT_S", cls.max_request_timeout_s, minimum=1),
            prompt_cache_size=_int("GENSERVE_PROMPT_CACHE_SIZE", cls.prompt_cache_size),
            batch_wait_ms=_int("GENSERVE_BATCH_WAIT_MS", cls.batch_wait_ms),
        )
