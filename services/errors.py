"""One error shape for every endpoint.

    HTTP status + {"error": {"code", "message", "field"?, "limit"?, "allowed"?, "request_id"}}

These are the domain's errors, raised by pipelines, engines and request checks that know
nothing of HTTP; the HTTP layer (services.http.STATUS) gives each its status.
`message` says what to change; `field` and `limit` say where and how far. What only the
operator should see (addresses, a backend's own error text) goes in `detail`: logged with
the request id, never answered.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    code: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, limit: Any = None,
                 allowed: list[Any] | None = None, headers: dict[str, str] | None = None,
                 detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.field = field
        self.limit = limit
        self.allowed = allowed
        self.headers = headers or {}

    def __str__(self) -> str:  # for logs and tracebacks: the operator's view
        return f"{self.message} [{self.detail}]" if self.detail else self.message

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        for key in ("field", "limit", "allowed"):
            value = getattr(self, key)
            if value is not None:
                error[key] = value
        if request_id:
            error["request_id"] = request_id
        return {"error": error}


class InvalidRequest(ServiceError):
    code = "invalid_request"


class ModelNotFound(ServiceError):
    code = "model_not_found"


class AdapterNotFound(ServiceError):
    code = "adapter_not_found"


class BackendUnavailable(ServiceError):
    """The inference backend (named in the message) cannot serve right now.

    Not the request's fault: the same request may succeed later, hence Retry-After
    (`retry_after_s`, 2 s unless the raiser knows better)."""

    code = "backend_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 2, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s
        self.headers.setdefault("Retry-After", str(retry_after_s))


class AdapterUnavailable(BackendUnavailable):
    """A LoRA adapter was unloaded or replaced again and again while a request waited for it."""

    code = "adapter_unavailable"


class MemoryLimited(BackendUnavailable):
    """The worker is near GENSERVE_MEMORY_LIMIT_MB: new work waits for running work to end."""

    code = "memory_limit"


class InferenceFailed(ServiceError):
    """The backend answered with an error for a well-formed request."""

    code = "inference_failed"


class NonFiniteOutput(InferenceFailed):
    """The model produced NaN or infinite values for this request (a model or numerics
    problem, not the client's input): only that request fails."""

    code = "non_finite_output"


class TooManyRequests(ServiceError):
    """Back-pressure: the queue is full. Carries Retry-After."""

    code = "queue_full"


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"


class ClientDisconnected(ServiceError):
    """The client hung up; its request was cancelled. Nobody reads this answer."""

    code = "client_disconnected"

    def __init__(self):
        super().__init__("client closed the connection; the request was cancelled")


class RateLimited(ServiceError):
    """A key (or client) spent its rate limit. Carries Retry-After."""

    code = "rate_limited"
