"""Service settings, read once from `GENSERVE_*` environment variables.

Every variable is documented in the README's configuration table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from services.memory import default_limit_mb

BACKENDS = ("onnxruntime", "triton")
TRITON_SHARED_MEMORY = ("auto", "off", "required")
ORT_THREAD_POOLS = ("shared", "per-session")


def _rate(name: str, default: "Rate | None" = None) -> "Rate | None":
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in ("0", "off"):
        return None
    try:
        return Rate.parse(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 0 or 1, got {raw!r}")


@dataclass(frozen=True)
class Rate:
    """A rate such as `20/s` or `600/min`: a token bucket refilling `count` per `per_s`
    seconds that holds at most `count` tokens (the burst)."""

    count: float
    per_s: float

    UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
             "h": 3600.0, "hour": 3600.0}

    @classmethod
    def parse(cls, text: str) -> "Rate":
        count, _, unit = text.partition("/")
        try:
            value = float(count)
        except ValueError:
            value = -1.0
        if value <= 0 or unit.strip().lower() not in cls.UNITS:
            raise ValueError(f"a rate is COUNT/UNIT with COUNT > 0 and UNIT one of s, min, h (e.g. 20/s), got {text!r}")
        return cls(value, cls.UNITS[unit.strip().lower()])

    @property
    def per_second(self) -> float:
        return self.count / self.per_s

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h"}[self.per_s]
        return f"{self.count:g}/{unit}"


def _networks(name: str) -> tuple[str, ...]:
    """Comma-separated IP addresses or networks (10.0.0.0/8), each checked and normalised."""
    import ipaddress

    items = []
    for item in (i.strip() for i in os.environ.get(name, "").split(",") if i.strip()):
        try:
            items.append(str(ipaddress.ip_network(item, strict=False) if "/" in item else ipaddress.ip_address(item)))
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
    return tuple(items)


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


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
    # Tensors to a same-host Triton through /dev/shm: negotiated (auto), never, or must.
    triton_shared_memory: str = "auto"
    # ONNX Runtime threads per session; 0 lets ONNX Runtime pick (all cores).
    ort_intra_op_threads: int = 0
    ort_inter_op_threads: int = 0
    # Calls expected to take at most this many ms run on the event loop, not in a worker thread
    # (0: never; in-process it saves the hand-off, over HTTP under load it cost throughput).
    ort_inline_ms: int = 0
    # ONNX Runtime's pool threads spin between calls (its default) or sleep (0). Measured on 2
    # cores (bench/README.md): sleeping gave concurrent load 11-23% more images/s but made one
    # request alone 20-27% slower, so the default keeps spinning.
    ort_allow_spinning: bool = True
    # One process-wide ONNX Runtime thread pool for every model (shared) or a pool per model's
    # session (per-session): per-session pools keep spinning on the cores after their model's
    # call; shared gave the step engine 1.15-1.47x the images/s at 16 clients on 2 cores (bench/README.md).
    ort_thread_pool: str = "shared"
    # The step engine serving a single request runs its calls expected under this many ms on
    # the event loop (nothing else to overlap; one request alone was 20% faster); 0: never.
    ort_alone_inline_ms: int = 20
    # Each family's model for requests that name none. Unset and not served: the family's only
    # model, or none when several are served (requests must name one; see GenServe._check_defaults).
    default_gan_model: str | None = "cgan_digits"
    default_diffusion_model: str | None = "sd_digits"
    default_ddpm_model: str | None = "ddpm_digits"
    default_vae_model: str | None = "vae_digits"
    # Engine: back-pressure bound (denoising steps x images still to run), deadlines.
    max_queued_steps: int = 4000
    # ... and by its drain time priced by the measured cost model (0: off).
    max_queue_seconds: int = 0
    # The most milliseconds one denoiser call may take when the engine picks its rows (0: off).
    engine_step_budget_ms: int = 0
    # Start-up timing of each denoiser by batch rows: no call starts that would end past this
    # (one one-row call always runs), so /readyz never waits for a ladder of real-size calls.
    warmup_budget_s: int = 20
    # The step engine's order: fair (deadlines, remaining work with aging, turns per API key) or fcfs.
    engine_policy: str = "fair"
    request_timeout_s: int = 120
    max_request_timeout_s: int = 600
    prompt_cache_size: int = 1024
    # Adaptive batching of single-pass models (GAN, VAE) on the embedded backend.
    batch_wait_ms: int = 2
    # /v1/upscale, /v1/translate and chained upscaling: the most output pixels per image
    # (checked from the input's header before decoding; memory is ~16 bytes per output pixel).
    max_upscale_pixels: int = 4096 * 4096
    # Image-to-image work per request: its estimated model seconds (tiles x measured cost),
    # and the activation memory of one model call (tiles per call are sized to fit).
    max_image_work_s: int = 120
    image_call_mb: int = 512
    # New work is refused (503) while the worker's RSS is past this (0: off); unset: a share
    # of the container's memory limit (services.memory).
    memory_limit_mb: int = 0
    # The public edge (services.gateway): body limits, keys, rate limits, CORS, shutdown.
    max_body_bytes: int = 20 * 1024 * 1024
    body_read_timeout_s: int = 30
    api_keys_file: Path | None = None
    metrics_require_key: bool = False
    rate_limit: Rate | None = None  # requests per key (per client address without keys)
    rate_limit_image_steps: Rate | None = None  # diffusion image-steps per key
    cors_origins: tuple[str, ...] = ()
    shutdown_grace_s: int = 30
    # Failed authentications per client address before 429 (all its keyed requests wait).
    auth_failure_limit: Rate | None = Rate(30, 60.0)
    # Connections (services.connections): proxies whose X-Forwarded-For names the client
    # (none by default), a request head's deadline, the idle keep-alive timeout, and the
    # connections one client address may hold open (0: no cap; trusted proxies have none).
    trusted_proxies: tuple[str, ...] = ()
    header_timeout_s: int = 10
    keep_alive_timeout_s: int = 5
    max_connections_per_client: int = 128

    @classmethod
    def from_env(cls) -> "Settings":
        backend = os.environ.get("GENSERVE_BACKEND", cls.backend).strip().lower()
        if backend not in BACKENDS:
            raise ValueError(f"GENSERVE_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
        shared_memory = os.environ.get("GENSERVE_TRITON_SHARED_MEMORY", cls.triton_shared_memory).strip().lower()
        if shared_memory not in TRITON_SHARED_MEMORY:
            raise ValueError(f"GENSERVE_TRITON_SHARED_MEMORY must be one of {', '.join(TRITON_SHARED_MEMORY)}, "
                             f"got {shared_memory!r}")
        spinning = _choice("GENSERVE_ORT_ALLOW_SPINNING", "1", ("1", "0")) == "1"
        settings = cls(
            backend=backend,
            model_repository=Path(os.environ.get("GENSERVE_MODEL_REPOSITORY", str(cls.model_repository))),
            triton_url=os.environ.get("GENSERVE_TRITON_URL", cls.triton_url),
            triton_timeout_s=_int("GENSERVE_TRITON_TIMEOUT_S", cls.triton_timeout_s, minimum=1),
            triton_shared_memory=shared_memory,
            ort_intra_op_threads=_int("GENSERVE_ORT_INTRA_OP_THREADS", cls.ort_intra_op_threads),
            ort_inter_op_threads=_int("GENSERVE_ORT_INTER_OP_THREADS", cls.ort_inter_op_threads),
            ort_inline_ms=_int("GENSERVE_ORT_INLINE_MS", cls.ort_inline_ms),
            ort_allow_spinning=spinning,
            # Unset: shared, unless sleeping threads were asked for (the shared pool always spins).
            ort_thread_pool=_choice("GENSERVE_ORT_THREAD_POOL", cls.ort_thread_pool if spinning else "per-session",
                                    ORT_THREAD_POOLS),
            ort_alone_inline_ms=_int("GENSERVE_ORT_ALONE_INLINE_MS", cls.ort_alone_inline_ms),
            default_gan_model=os.environ.get("GENSERVE_DEFAULT_GAN_MODEL", cls.default_gan_model),
            default_diffusion_model=os.environ.get("GENSERVE_DEFAULT_DIFFUSION_MODEL", cls.default_diffusion_model),
            default_ddpm_model=os.environ.get("GENSERVE_DEFAULT_DDPM_MODEL", cls.default_ddpm_model),
            default_vae_model=os.environ.get("GENSERVE_DEFAULT_VAE_MODEL", cls.default_vae_model),
            max_queued_steps=_int("GENSERVE_MAX_QUEUED_STEPS", cls.max_queued_steps, minimum=1),
            max_queue_seconds=_int("GENSERVE_MAX_QUEUE_SECONDS", cls.max_queue_seconds),
            engine_step_budget_ms=_int("GENSERVE_ENGINE_STEP_BUDGET_MS", cls.engine_step_budget_ms),
            warmup_budget_s=_int("GENSERVE_WARMUP_BUDGET_S", cls.warmup_budget_s),
            engine_policy=_choice("GENSERVE_ENGINE_POLICY", cls.engine_policy, ("fair", "fcfs")),
            request_timeout_s=_int("GENSERVE_REQUEST_TIMEOUT_S", cls.request_timeout_s, minimum=1),
            max_request_timeout_s=_int("GENSERVE_MAX_REQUEST_TIMEOUT_S", cls.max_request_timeout_s, minimum=1),
            prompt_cache_size=_int("GENSERVE_PROMPT_CACHE_SIZE", cls.prompt_cache_size),
            batch_wait_ms=_int("GENSERVE_BATCH_WAIT_MS", cls.batch_wait_ms),
            max_upscale_pixels=_int("GENSERVE_MAX_UPSCALE_PIXELS", cls.max_upscale_pixels, minimum=1),
            max_image_work_s=_int("GENSERVE_MAX_IMAGE_WORK_S", cls.max_image_work_s),
            image_call_mb=_int("GENSERVE_IMAGE_CALL_MB", cls.image_call_mb, minimum=1),
            memory_limit_mb=_int("GENSERVE_MEMORY_LIMIT_MB", default_limit_mb()),
            max_body_bytes=_int("GENSERVE_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024),
            body_read_timeout_s=_int("GENSERVE_BODY_READ_TIMEOUT_S", cls.body_read_timeout_s, minimum=1),
            api_keys_file=Path(keys) if (keys := os.environ.get("GENSERVE_API_KEYS_FILE", "").strip()) else None,
            metrics_require_key=_flag("GENSERVE_METRICS_REQUIRE_KEY"),
            rate_limit=_rate("GENSERVE_RATE_LIMIT"),
            rate_limit_image_steps=_rate("GENSERVE_RATE_LIMIT_IMAGE_STEPS"),
            cors_origins=tuple(o.strip().rstrip("/") for o in os.environ.get("GENSERVE_CORS_ORIGINS", "").split(",")
                               if o.strip()),
            shutdown_grace_s=_int("GENSERVE_SHUTDOWN_GRACE_S", cls.shutdown_grace_s),
            auth_failure_limit=_rate("GENSERVE_AUTH_FAILURE_LIMIT", cls.auth_failure_limit),
            trusted_proxies=_networks("GENSERVE_TRUSTED_PROXIES"),
            header_timeout_s=_int("GENSERVE_HEADER_TIMEOUT_S", cls.header_timeout_s, minimum=1),
            keep_alive_timeout_s=_int("GENSERVE_KEEP_ALIVE_TIMEOUT_S", cls.keep_alive_timeout_s, minimum=1),
            max_connections_per_client=_int("GENSERVE_MAX_CONNECTIONS_PER_CLIENT", cls.max_connections_per_client),
        )
        if backend == "onnxruntime" and settings.ort_thread_pool == "shared" and not settings.ort_allow_spinning:
            raise ValueError("GENSERVE_ORT_ALLOW_SPINNING=0 needs GENSERVE_ORT_THREAD_POOL=per-session: "
                             "ONNX Runtime's shared thread pool always spins")
        return settings
