"""genserve's own Prometheus metrics, served on /metrics beside BentoML's.

Names carry the `genserve_` prefix and base units; labels are `pipeline`, `model`,
`backend`. prometheus_client is imported when ServiceMetrics is built (inside the
service's __init__), after BentoML's worker has set PROMETHEUS_MULTIPROC_DIR: imported
earlier, it would count in process-local memory that /metrics never reads.
"""

from __future__ import annotations

import time

# From a 1 ms GAN call to a multi-minute diffusion request.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    def __init__(self, registry=None):
        import prometheus_client as prom

        kw = {"registry": registry} if registry is not None else {}
        self.images_generated = prom.Counter(
            "genserve_images_generated", "Images returned to clients.",
            ["pipeline", "model", "backend"], **kw)
        self.model_execution_seconds = prom.Histogram(
            "genserve_model_execution_seconds", "Wall time of one model execution (one batch).",
            ["model", "backend"], buckets=LATENCY_BUCKETS, **kw)
        self.model_batch_size = prom.Histogram(
            "genserve_model_batch_size", "Samples per model execution.",
            ["model", "backend"], buckets=BATCH_BUCKETS, **kw)
        self.pipeline_duration_seconds = prom.Histogram(
            "genserve_pipeline_duration_seconds", "Wall time of a pipeline run, request in to pixels out.",
            ["pipeline", "model", "backend"], buckets=LATENCY_BUCKETS, **kw)
        self.errors = prom.Counter(
            "genserve_errors", "Requests answered with an error, by error code (endpoint: a served "
            "route or `unmatched`, so made-up paths add no series).",
            ["endpoint", "code"], **kw)
        self.rate_limited = prom.Counter(
            "genserve_rate_limited", "Requests refused by a rate limit, by key id (`anonymous` without "
            "API keys: client addresses are never labels) and limit (requests, image_steps).",
            ["key", "limit"], **kw)

        self.engine_batch_rows = prom.Histogram(
            "genserve_engine_batch_rows", "U-Net rows per engine iteration (images x 2 with guidance).",
            ["model"], buckets=BATCH_BUCKETS, **kw)
        self.engine_batch_requests = prom.Histogram(
            "genserve_engine_batch_requests", "Requests sharing one engine iteration.",
            ["model"], buckets=BATCH_BUCKETS, **kw)
        self.engine_queue_requests = prom.Gauge(
            "genserve_engine_queue_requests", "Diffusion requests admitted and not finished.",
            ["model"], multiprocess_mode="livesum", **kw)
        self.engine_queue_steps = prom.Gauge(
            "genserve_engine_queue_steps", "Denoising steps still to run (per image) in the engine.",
            ["model"], multiprocess_mode="livesum", **kw)
        self.engine_denoising_steps = prom.Counter(
            "genserve_engine_denoising_steps", "Image denoising steps run.", ["model"], **kw)
        self.engine_requests_finished = prom.Counter(
            "genserve_engine_requests_finished", "Diffusion requests leaving the engine, by reason "
            "(done, cancelled, timeout, error).", ["model", "reason"], **kw)
        self.engine_first_step_seconds = prom.Histogram(
            "genserve_engine_first_step_seconds", "Time from a diffusion request's admission to the end of "
            "its first denoising step (a stream's first progress event): the wait the step order decides.",
            ["model"], buckets=LATENCY_BUCKETS, **kw)
        self.engine_cost_seconds = prom.Gauge(
            "genserve_engine_cost_seconds", "The engine's cost model: seconds per denoiser call by batch "
            "rows at the native size (start-up timing, refreshed by live calls).",
            ["model", "rows"], multiprocess_mode="livemax", **kw)
        self.engine_best_rows = prom.Gauge(
            "genserve_engine_best_rows", "Rows per iteration the engine fills to: the most rows per second "
            "by its cost model within the latency budget.", ["model"], multiprocess_mode="livemax", **kw)
        self.engine_rows_per_second = prom.Gauge(
            "genserve_engine_rows_per_second", "Denoiser rows per second at the best size, by the cost model "
            "(what Retry-After and the drain-time bound are priced with).",
            ["model"], multiprocess_mode="livemax", **kw)
        self.prompt_cache_lookups = prom.Counter(
            "genserve_prompt_cache_lookups", "Prompt-embedding cache lookups by result (hit, miss).",
            ["model", "result"], **kw)
        self.adapter_lookups = prom.Counter(
            "genserve_adapter_lookups", "LoRA adapters named by requests, by whether they were loaded already "
            "(hit) or had to be loaded first (miss).", ["model", "result"], **kw)
        self.adapter_loads = prom.Counter(
            "genserve_adapter_loads", "LoRA adapters loaded, by where from (repository, directory, converted: a "
            "file as published, converted first).", ["model", "source"], **kw)
        self.adapter_load_seconds = prom.Histogram(
            "genserve_adapter_load_seconds", "Time to load a LoRA adapter (a conversion included).",
            ["source"], buckets=LATENCY_BUCKETS, **kw)
        self.adapter_evictions = prom.Counter(
            "genserve_adapter_evictions", "LoRA adapters unloaded, by reason (memory: the least recently used "
            "idle one, under GENSERVE_ADAPTER_MEMORY_MB; deleted: DELETE /v1/adapters or a reload).",
            ["model", "reason"], **kw)
        self.adapters_loaded = prom.Gauge(
            "genserve_adapters_loaded", "LoRA adapters loaded now.", multiprocess_mode="livesum", **kw)
        self.adapter_bytes = prom.Gauge(
            "genserve_adapter_bytes", "Bytes of LoRA adapters in memory (loaded, or held by running requests).",
            multiprocess_mode="livesum", **kw)

        self.triton_calls = prom.Counter(
            "genserve_triton_calls", "Calls to Triton by how their tensors travelled (shared_memory: "
            "regions in /dev/shm; socket: inside the gRPC messages).", ["model", "transport"], **kw)
        self.triton_shared_memory_active = prom.Gauge(
            "genserve_triton_shared_memory_active", "1 while tensors go to Triton through shared memory, "
            "0 while they go through the socket (GENSERVE_TRITON_SHARED_MEMORY off, or a fallback).",
            multiprocess_mode="livemin", **kw)
        self.triton_shared_memory_bytes = prom.Gauge(
            "genserve_triton_shared_memory_bytes", "Bytes of shared-memory regions mapped and registered "
            "with Triton.", multiprocess_mode="livesum", **kw)
        self.gc_frozen_objects = prom.Gauge(
            "genserve_gc_frozen_objects", "Objects of the start-up heap taken out of the garbage collector's "
            "full collections (services.memory.freeze_startup_heap).", multiprocess_mode="livemin", **kw)
        self.gc_full_collection_seconds = prom.Histogram(
            "genserve_gc_full_collection_seconds", "Python's full garbage collections (generation 2), each "
            "holding the GIL: every request and engine iteration of the worker waits.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), **kw)
        self._gc_started = 0.0
        self._gc_pending: list[float] = []  # durations noted by observe_gc, for flush_gc
        # Labelled children of the metrics observed on every model call and engine iteration,
        # by label values: `labels()` costs a lock and a lookup each time (7 per iteration).
        self._children: dict[tuple, tuple] = {}

    def _labelled(self, key: tuple, *metrics) -> tuple:
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = tuple(m.labels(*key[1:]) for m in metrics)
        return children

    def observe_gc(self, phase: str, info: dict) -> None:
        """A gc.callbacks hook: times full collections (the young ones cost microseconds). It
        only notes the time: any allocation can start a collection, one inside a metric's own
        (non-reentrant) lock included, so the histogram is updated later (flush_gc)."""
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self._gc_pending.append(time.perf_counter() - self._gc_started)
            self._gc_started = 0.0

    def flush_gc(self) -> None:
        """The full collections noted since, into their histogram (called outside any metric's lock)."""
        while self._gc_pending:
            self.gc_full_collection_seconds.observe(self._gc_pending.pop())

    def observe_triton_call(self, model: str, transport: str) -> None:
        self.triton_calls.labels(model, transport).inc()

    def observe_triton_shared_memory(self, active: bool, region_bytes: int) -> None:
        self.triton_shared_memory_active.set(1 if active else 0)
        self.triton_shared_memory_bytes.set(region_bytes)

    def observe_rate_limited(self, client: str, limit: str) -> None:
        key = client[4:] if client.startswith("key:") else "anonymous"
        self.rate_limited.labels(key, limit).inc()

    def observe_prompt_cache(self, model: str, hit: bool) -> None:
        self.prompt_cache_lookups.labels(model, "hit" if hit else "miss").inc()

    def engine_observer(self) -> EngineMetrics:
        return EngineMetrics(self)

    def adapter_observer(self) -> AdapterMetrics:
        return AdapterMetrics(self)

    def observe_execution(self, model: str, backend: str, batch: int, seconds: float) -> None:
        """An InferenceBackend observer (see services.runtime.base)."""
        execution, batch_size = self._labelled(("execution", model, backend), self.model_execution_seconds,
                                               self.model_batch_size)
        execution.observe(seconds)
        batch_size.observe(batch)
        self.flush_gc()


class EngineMetrics:
    """The engine's observer (services.engine.engine.EngineObserver, met by its shape)."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def iteration(self, model: str, rows: int, requests: int, images: int) -> None:
        m = self.metrics
        batch_rows, batch_requests, steps = m._labelled(
            ("iteration", model), m.engine_batch_rows, m.engine_batch_requests, m.engine_denoising_steps)
        batch_rows.observe(rows)
        batch_requests.observe(requests)
        steps.inc(images)

    def queue(self, model: str, requests: int, image_steps: int) -> None:
        m = self.metrics
        queue_requests, queue_steps, _ = m._labelled(
            ("queue", model), m.engine_queue_requests, m.engine_queue_steps,
            m.engine_first_step_seconds)  # the first-step series exists from start-up
        queue_requests.set(requests)
        queue_steps.set(image_steps)

    def finished(self, model: str, reason: str) -> None:
        self.metrics.engine_requests_finished.labels(model, reason).inc()

    def first_step(self, model: str, seconds: float) -> None:
        self.metrics.engine_first_step_seconds.labels(model).observe(seconds)

    def cost(self, model: str, table: dict) -> None:
        if not table.get("measured"):
            return
        m = self.metrics
        for rows, ms in table["ms_per_call"].items():
            m.engine_cost_seconds.labels(model, rows).set(ms / 1000)
        m.engine_best_rows.labels(model).set(table["best_rows"])
        m.engine_rows_per_second.labels(model).set(table["rows_per_second"])


class AdapterMetrics:
    """The adapter library's observer (services.adapter_library.AdapterObserver)."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def loaded(self, pipeline: str, source: str, seconds: float) -> None:
        self.metrics.adapter_loads.labels(pipeline, source).inc()
        self.metrics.adapter_load_seconds.labels(source).observe(seconds)

    def evicted(self, pipeline: str, reason: str) -> None:
        self.metrics.adapter_evictions.labels(pipeline, reason).inc()

    def lookup(self, pipeline: str, hit: bool) -> None:
        self.metrics.adapter_lookups.labels(pipeline, "hit" if hit else "miss").inc()

    def memory(self, adapters: int, nbytes: int) -> None:
        self.metrics.adapters_loaded.set(adapters)
        self.metrics.adapter_bytes.set(nbytes)


_metrics: ServiceMetrics | None = None


def service_metrics() -> ServiceMetrics:
    """The process's metrics, created on first use (inside the BentoML worker)."""
    global _metrics
    if _metrics is None:
        _metrics = ServiceMetrics()
    return _metrics
