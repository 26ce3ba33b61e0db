"""Service settings, read once from `GENSERVE_*` environment variables.

Each variable is declared once, beside its field (`env(...)`: name, default, parser, and
the meaning the README's configuration table shows); `Settings.from_env()` is the one
loader, and `python -m services.config` prints the table (a test keeps the README's equal).
Fields are grouped by who reads them: `settings.edge`, `settings.ort`, `settings.triton`,
`settings.engine`, `settings.adapters`, `settings.defaults`, `settings.images`, `settings.memory`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from services.memory import default_limit_mb

BACKENDS = ("onnxruntime", "triton")
TRITON_SHARED_MEMORY = ("auto", "off", "required")
ORT_THREAD_POOLS = ("shared", "per-session")

# (variable name, its raw text, the default) -> the value; a ValueError names the variable.
Parser = Callable[[str, str, Any], Any]


@dataclass(frozen=True)
class Variable:
    """One environment variable: `unset(loaded)` gives the default when the variable is
    absent and the default depends on the host or on the group's fields declared before it."""

    name: str
    parse: Parser
    doc: str
    shown_default: str
    unset: Callable[[dict[str, Any]], Any] | None = None


def env(name: str, default: Any, parse: Parser, doc: str, shown_default: str | None = None,
        unset: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """A settings field read from `name`."""
    shown = shown_default if shown_default is not None else f"`{default}`"
    return field(default=default, metadata={"env": Variable(name, parse, doc, shown, unset)})


def group(cls: type) -> Any:
    """A field holding a group of settings."""
    return field(default_factory=cls, metadata={"group": cls})


# -- parsers -------------------------------------------------------------------------------

def text(name: str, raw: str, default: Any) -> str:
    return raw


def path(name: str, raw: str, default: Any) -> Path:
    return Path(raw)


def optional_path(name: str, raw: str, default: Any) -> Path | None:
    return Path(raw.strip()) if raw.strip() else None


def integer(minimum: int = 0) -> Parser:
    def parse(name: str, raw: str, default: int) -> int:
        if raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
        return value
    return parse


def choice(*allowed: str, blank_is_default: bool = True) -> Parser:
    """One of `allowed`, case-insensitive (blank: the default, unless `blank_is_default` is off)."""
    def parse(name: str, raw: str, default: str) -> str:
        value = raw.strip().lower()
        if blank_is_default:
            value = value or default
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value
    return parse


def switch(name: str, raw: str, default: bool) -> bool:
    """`1` or `0` (blank: the default)."""
    return choice("1", "0")(name, raw, "1" if default else "0") == "1"


def flag(name: str, raw: str, default: bool) -> bool:
    value = raw.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")


def rate(name: str, raw: str, default: Rate | None) -> Rate | None:
    value = raw.strip()
    if not value:
        return default
    if value.lower() in ("0", "off"):
        return None
    try:
        return Rate.parse(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def networks(name: str, raw: str, default: Any) -> tuple[str, ...]:
    """Comma-separated IP addresses or networks (10.0.0.0/8), each checked and normalised."""
    import ipaddress

    items = []
    for item in (i.strip() for i in raw.split(",") if i.strip()):
        try:
            items.append(str(ipaddress.ip_network(item, strict=False) if "/" in item else ipaddress.ip_address(item)))
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
    return tuple(items)


def paths(name: str, raw: str, default: Any) -> tuple[Path, ...]:
    """Comma-separated directories; each must exist."""
    found = tuple(Path(p.strip()) for p in raw.split(",") if p.strip())
    for p in found:
        if not p.is_dir():
            raise ValueError(f"{name}: {str(p)!r} is not a directory")
    return found


def origins(name: str, raw: str, default: Any) -> tuple[str, ...]:
    return tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())


@dataclass(frozen=True)
class Rate:
    """A rate such as `20/s` or `600/min`: a token bucket refilling `count` per `per_s`
    seconds that holds at most `count` tokens (the burst)."""

    count: float
    per_s: float

    UNITS: ClassVar[dict[str, float]] = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0,
                                         "minute": 60.0, "h": 3600.0, "hour": 3600.0}

    @classmethod
    def parse(cls, text: str) -> Rate:
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


# -- groups --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DefaultModels:
    """Each family's model for requests that name none. Unset and not served: the family's
    only model, or none when several are served (requests must name one; see
    GenServe._check_defaults)."""

    gan: str | None = env(
        "GENSERVE_DEFAULT_GAN_MODEL", "cgan_digits", text,
        "model used when a GAN request names none. Each `GENSERVE_DEFAULT_*_MODEL` left unset whose built-in "
        "default is not served falls back to the family's only model, or to none when several are served "
        "(requests must then name `model`, the `422` says so); one set to a model not served stops the start-up")
    diffusion: str | None = env("GENSERVE_DEFAULT_DIFFUSION_MODEL", "sd_digits", text,
                                "text-to-image pipeline used when a request names none")
    ddpm: str | None = env("GENSERVE_DEFAULT_DDPM_MODEL", "ddpm_digits", text,
                           "pixel-space diffusion model used when a request names none")
    vae: str | None = env("GENSERVE_DEFAULT_VAE_MODEL", "vae_digits", text, "VAE used when a request names none")


@dataclass(frozen=True)
class EngineSettings:
    """The step engine (services.engine): back-pressure, step sizing, order, deadlines."""

    max_queued_steps: int = env(
        "GENSERVE_MAX_QUEUED_STEPS", 4000, integer(minimum=1),
        "back-pressure: denoising steps × images queued per pipeline before `429`")
    max_queue_seconds: int = env(
        "GENSERVE_MAX_QUEUE_SECONDS", 0, integer(),
        "back-pressure by time: `429` when the queue's denoising work, priced by the measured cost model, "
        "would pass this many seconds (0 = off)")
    step_budget_ms: int = env(
        "GENSERVE_ENGINE_STEP_BUDGET_MS", 0, integer(),
        "the most milliseconds one denoiser call may take when the engine picks its rows per iteration "
        "(0 = no bound: most rows per second)")
    # /readyz must never wait for a ladder of real-size calls.
    warmup_budget_s: int = env(
        "GENSERVE_WARMUP_BUDGET_S", 20, integer(),
        "start-up timing of each denoiser by batch rows stops before a call that would end past this many "
        "seconds (one one-row call always runs); a denoiser's rows per call are also capped by its recorded "
        "activation memory per row against half the memory available at start-up")
    policy: str = env(
        "GENSERVE_ENGINE_POLICY", "fair", choice("fair", "fcfs"),
        "the step engine's order under contention: `fair` (first steps first, then near deadlines, then least "
        "remaining work with aging; API keys take turns) or `fcfs` (arrival order: the oldest run to "
        "completion first)")
    overlap: str = env(
        "GENSERVE_ENGINE_OVERLAP", "auto", choice("auto", "1", "0"),
        "`1`: each iteration's denoiser call starts as soon as the last one's outputs are applied, and the "
        "rest (text encoding of new requests, decoding, previews, HTTP) runs while it executes; `0`: one stage "
        "after another; `auto`: `1` when the denoiser runs off this worker's cores (Triton), `0` on the "
        "embedded CPU backend, where that work would take the cores from the denoiser (bench/README.md)")
    request_timeout_s: int = env("GENSERVE_REQUEST_TIMEOUT_S", 120, integer(minimum=1),
                                 "default diffusion deadline (`timeout_s`)")
    max_request_timeout_s: int = env("GENSERVE_MAX_REQUEST_TIMEOUT_S", 600, integer(minimum=1),
                                     "largest `timeout_s` a client may ask for")
    prompt_cache_size: int = env("GENSERVE_PROMPT_CACHE_SIZE", 1024, integer(),
                                 "prompt embeddings kept (LRU; the empty prompt is pinned)")
    max_adapters_per_request: int = env(
        "GENSERVE_MAX_ADAPTERS_PER_REQUEST", 4, integer(),
        "LoRA adapters one diffusion request may name in `lora`; past it, `422` (0: requests take none)")


@dataclass(frozen=True)
class AdapterSettings:
    """LoRA adapters loaded at run time (services.adapter_library, `/v1/adapters`)."""

    dirs: tuple[Path, ...] = env(
        "GENSERVE_ADAPTER_DIRS", (), paths,
        "comma-separated directories adapters load from at run time (`POST /v1/adapters`, or a request naming "
        "`<name>` found there as `<name>.safetensors` or a `python -m export lora --out` folder)",
        shown_default="empty (the repository's adapters only)")
    memory_mb: int = env(
        "GENSERVE_ADAPTER_MEMORY_MB", 1024, integer(),
        "memory for loaded adapters (fp32 factors); a load past it unloads the least recently used idle ones "
        "(0 = no cap)")
    cache_dir: Path | None = env(
        "GENSERVE_ADAPTER_CACHE_DIR", None, optional_path,
        "where LoRA files as published are converted to for this pipeline (kept while the file is unchanged)",
        shown_default="unset (a temporary folder)")


@dataclass(frozen=True)
class ImageSettings:
    """Image-to-image work (/v1/upscale, /v1/translate, chained upscaling)."""

    # Checked from the input's header before decoding.
    max_upscale_pixels: int = env(
        "GENSERVE_MAX_UPSCALE_PIXELS", 4096 * 4096, integer(minimum=1),
        "most output pixels of one `/v1/upscale`/`/v1/translate` image or chained upscale; checked from the "
        "header before decoding (memory ≈ 24 bytes per output pixel: [Memory](#memory))",
        shown_default="`16777216` (4096²)")
    max_work_s: int = env(
        "GENSERVE_MAX_IMAGE_WORK_S", 120, integer(),
        "most model seconds one image-to-image request may take, estimated before work as tiles × the measured "
        "cost per tile; `422` past it (0: off)")
    call_mb: int = env(
        "GENSERVE_IMAGE_CALL_MB", 512, integer(minimum=1),
        "activation memory one image-to-image model call may take: tiles per call are sized to fit; a tile "
        "whose one row passes it is a `422`")


@dataclass(frozen=True)
class MemorySettings:
    # 0 when built by hand: only the loader reads the container's limit.
    limit_mb: int = env(
        "GENSERVE_MEMORY_LIMIT_MB", 0, integer(),
        "the worker's RSS past which new work is refused with `503 memory_limit` and `Retry-After`",
        shown_default="85% of the container's limit (0, off, without one)", unset=lambda loaded: default_limit_mb())


@dataclass(frozen=True)
class OrtSettings:
    """The embedded backend: ONNX Runtime's threads and where its calls run."""

    intra_op_threads: int = env("GENSERVE_ORT_INTRA_OP_THREADS", 0, integer(),
                                "threads inside one ONNX Runtime op", shown_default="`0` (ONNX Runtime decides)")
    inter_op_threads: int = env("GENSERVE_ORT_INTER_OP_THREADS", 0, integer(), "threads across independent ops")
    inline_ms: int = env(
        "GENSERVE_ORT_INLINE_MS", 0, integer(),
        "an ONNX Runtime call expected (from the model's measured time per row) to take at most this many ms "
        "runs on the event loop instead of a worker thread: it saves the thread hand-off inside the engine "
        "(`bench/bench_engine.py`), but blocks HTTP work meanwhile, and over HTTP under load it cost throughput "
        "(`bench/README.md`); 0 = never for every call (see the next line for a lone request)")
    alone_inline_ms: int = env(
        "GENSERVE_ORT_ALONE_INLINE_MS", 20, integer(),
        "the step engine serving a single request, with no other call of the backend in flight, runs its calls "
        "expected under this many ms on the event loop: nothing else is there to overlap, and one request alone "
        "was 20% faster end to end for it (`bench/README.md`); the engine yields between a step's stages, so a "
        "new request waits at most one stage's calls (a U-Net step and its preview's decode, at most) to be "
        "read; 0 = never")
    # Declared before thread_pool: its default depends on this.
    allow_spinning: bool = env(
        "GENSERVE_ORT_ALLOW_SPINNING", True, switch,
        "`0`: ONNX Runtime's pool threads sleep between calls instead of spinning (the shared pool always "
        "spins: with `GENSERVE_ORT_THREAD_POOL` unset this picks per-session pools, and with it set to `shared` "
        "the service refuses to start, naming both); with per-session pools on 2 cores it gave 16 concurrent "
        "txt2img clients 11–23% more images/s and one request alone 20–27% more latency (`bench/README.md`, "
        "where `GENSERVE_ORT_INTRA_OP_THREADS=1` is measured too)", shown_default="`1`")
    # Unset: shared, unless sleeping threads were asked for (the shared pool always spins).
    thread_pool: str = env(
        "GENSERVE_ORT_THREAD_POOL", "shared", choice(*ORT_THREAD_POOLS),
        "`shared`: one ONNX Runtime thread pool for every model in the process; `per-session`: a pool per "
        "model (ONNX Runtime's own default), each spinning on the cores for a while after its model's call, "
        "through the U-Net calls that follow a text-encoder or VAE call; on 2 cores the shared pool gave the "
        "step engine 1.15–1.47x the images/s at 16 clients and 1.04–1.33x at 1 (`bench/README.md`). Outputs "
        "are bit-identical either way. The choice is per process (ONNX Runtime opens no per-session pool once "
        "the shared one exists)",
        unset=lambda loaded: "shared" if loaded["allow_spinning"] else "per-session")
    # Request merging of single-pass models here; Triton's dynamic batcher does it there.
    batch_wait_ms: int = env(
        "GENSERVE_BATCH_WAIT_MS", 2, integer(),
        "adaptive batching wait for GAN calls and SR/translator tiles (embedded backend; 0 = off)")


@dataclass(frozen=True)
class TritonSettings:
    url: str = env("GENSERVE_TRITON_URL", "localhost:8001", text, "Triton gRPC address (Triton backend)")
    timeout_s: int = env("GENSERVE_TRITON_TIMEOUT_S", 60, integer(minimum=1),
                         "deadline of one Triton call; past it, `503`")
    shared_memory: str = env(
        "GENSERVE_TRITON_SHARED_MEMORY", "auto", choice(*TRITON_SHARED_MEMORY, blank_is_default=False),
        "tensors to a Triton on the same host through `/dev/shm` regions instead of the gRPC socket: `auto` "
        "negotiates at start-up and falls back to the socket (logged; `genserve_triton_shared_memory_active` 0), "
        "`required` refuses to start without it, `off` never tries")


@dataclass(frozen=True)
class EdgeSettings:
    """The public edge (services.gateway, services.connections): bodies, keys, rate limits,
    CORS, shutdown, connections."""

    max_body_bytes: int = env("GENSERVE_MAX_BODY_BYTES", 20 * 1024 * 1024, integer(minimum=1024),
                              "largest request body; past it, `413`", shown_default="`20971520` (20 MiB)")
    body_read_timeout_s: int = env(
        "GENSERVE_BODY_READ_TIMEOUT_S", 30, integer(minimum=1),
        "time a client has to send the whole body; past it, `408` and the connection closes")
    api_keys_file: Path | None = env(
        "GENSERVE_API_KEYS_FILE", None, optional_path,
        "keys file: one key, or `sha256:<hex>` of one, per line; re-read on change", shown_default="unset (auth off)")
    admin_keys_file: Path | None = env(
        "GENSERVE_ADMIN_KEYS_FILE", None, optional_path,
        "keys file (as above) for the operators' endpoints (`POST`/`DELETE /v1/adapters`): only these keys may "
        "call them", shown_default="unset (API keys apply)")
    metrics_require_key: bool = env("GENSERVE_METRICS_REQUIRE_KEY", False, flag, "`1`: `/metrics` needs a key too",
                                    shown_default="`0`")
    rate_limit: Rate | None = env(
        "GENSERVE_RATE_LIMIT", None, rate,
        "requests per key (per address without keys), e.g. `20/s`, `600/min`", shown_default="unset (off)")
    rate_limit_image_steps: Rate | None = env(
        "GENSERVE_RATE_LIMIT_IMAGE_STEPS", None, rate,
        "diffusion image-steps (steps × images) per key, e.g. `2000/min`", shown_default="unset (off)")
    cors_origins: tuple[str, ...] = env("GENSERVE_CORS_ORIGINS", (), origins,
                                        "comma-separated origins allowed to call from a browser",
                                        shown_default="empty (CORS off)")
    shutdown_grace_s: int = env("GENSERVE_SHUTDOWN_GRACE_S", 30, integer(),
                                "after SIGTERM, how long requests in flight may take to finish")
    # All of a client address's keyed requests wait once it passes this.
    auth_failure_limit: Rate | None = env(
        "GENSERVE_AUTH_FAILURE_LIMIT", Rate(30, 60.0), rate,
        "failed authentications per client address (with API keys on) before its keyed requests get `429`; "
        "`off` to disable", shown_default="`30/min`")
    trusted_proxies: tuple[str, ...] = env(
        "GENSERVE_TRUSTED_PROXIES", (), networks,
        "comma-separated addresses or networks (`10.0.0.0/8`) of proxies whose `X-Forwarded-For` names the "
        "client; they are not subject to the connection cap", shown_default="empty (none)")
    header_timeout_s: int = env(
        "GENSERVE_HEADER_TIMEOUT_S", 10, integer(minimum=1),
        "time a connection has to send a request's line and headers (from opening, or from the previous "
        "response); past it, `408` and close")
    keep_alive_timeout_s: int = env("GENSERVE_KEEP_ALIVE_TIMEOUT_S", 5, integer(minimum=1),
                                    "an idle kept-alive connection closes after this many seconds")
    max_connections_per_client: int = env(
        "GENSERVE_MAX_CONNECTIONS_PER_CLIENT", 128, integer(),
        "connections one client address may hold open; past it, `429` and close (0 = no cap)")


@dataclass(frozen=True)
class Settings:
    backend: str = env("GENSERVE_BACKEND", "onnxruntime", choice(*BACKENDS, blank_is_default=False),
                       "inference backend: `onnxruntime` (embedded) or `triton`")
    model_repository: Path = env("GENSERVE_MODEL_REPOSITORY", Path("model_repository"), path,
                                 "Triton model repository to serve")
    defaults: DefaultModels = group(DefaultModels)
    engine: EngineSettings = group(EngineSettings)
    adapters: AdapterSettings = group(AdapterSettings)
    images: ImageSettings = group(ImageSettings)
    memory: MemorySettings = group(MemorySettings)
    ort: OrtSettings = group(OrtSettings)
    triton: TritonSettings = group(TritonSettings)
    edge: EdgeSettings = group(EdgeSettings)

    @classmethod
    def from_env(cls) -> Settings:
        settings = _load(cls)
        ort = settings.ort
        if settings.backend == "onnxruntime" and ort.thread_pool == "shared" and not ort.allow_spinning:
            raise ValueError("GENSERVE_ORT_ALLOW_SPINNING=0 needs GENSERVE_ORT_THREAD_POOL=per-session: "
                             "ONNX Runtime's shared thread pool always spins")
        return settings

    def with_defaults(self, **models: str | None) -> Settings:
        """These settings with some default models replaced (GenServe._check_defaults)."""
        return replace(self, defaults=replace(self.defaults, **models))


def _load(cls: type) -> Any:
    """`cls` with every variable read from the environment, groups recursively, in
    declaration order (an `unset` default sees the fields loaded before it)."""
    loaded: dict[str, Any] = {}
    for f in fields(cls):
        if "group" in f.metadata:
            loaded[f.name] = _load(f.metadata["group"])
            continue
        var: Variable = f.metadata["env"]
        default = var.unset(loaded) if var.unset else f.default
        raw = os.environ.get(var.name)
        loaded[f.name] = default if raw is None else var.parse(var.name, raw, default)
    return cls(**loaded)


def variables(cls: type = Settings) -> list[Variable]:
    """Every variable, in the order of the fields (groups in place)."""
    found: list[Variable] = []
    for f in fields(cls):
        found += variables(f.metadata["group"]) if "group" in f.metadata else [f.metadata["env"]]
    return found


def table() -> str:
    """The README's configuration table."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {v.shown_default} | {v.doc} |" for v in variables()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(table(), end="")
