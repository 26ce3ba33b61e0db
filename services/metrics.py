"""genserve's own Prometheus metrics, served on /metrics beside BentoML's.

Names carry the `genserve_` prefix and base units; labels are `pipeline`, `model`,
`backend`. prometheus_client is imported when ServiceMetrics is built (inside the
service's __init__), after BentoML's worker has set PROMETHEUS_MULTIPROC_DIR: imported
earlier, it would count in process-local memory that /metrics never reads.
"""

from __future__ import annotations

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
            "genserve_errors", "Requests answered with an error, by error code.",
            ["endpoint", "code"], **kw)

    def observe_execution(self, model: str, backend: str, batch: int, seconds: float) -> None:
        """An InferenceBackend observer (see services.runtime.base)."""
        self.model_execution_seconds.labels(model, backend).observe(seconds)
        self.model_batch_size.labels(model, backend).observe(batch)
