"""Typed exceptions carrying genserve's error shape:
HTTP status + {"error": {"code", "message", "field"?, "limit"?, "allowed"?, "request_id"}}."""

from __future__ import annotations

from typing import Any, Optional


class GenServeError(Exception):
    """Base of every error this client raises."""


class APIConnectionError(GenServeError):
    """The server could not be reached, or the connection broke (after the retries)."""


class APIError(GenServeError):
    """The server answered with an error. Its fields are the error shape's."""

    status: int = 0

    def __init__(self, status: int, body: Any, headers: Optional[dict] = None):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        error = error if isinstance(error, dict) else {}
        self.status = status
        self.code: str = error.get("code") or "unknown"
        self.message: str = error.get("message") or f"HTTP {status}"
        self.field: Optional[str] = error.get("field") or error.get("param")
        self.limit: Any = error.get("limit")
        self.allowed: Optional[list] = error.get("allowed")
        self.request_id: Optional[str] = error.get("request_id") or (headers or {}).get("x-request-id")
        self.details: Optional[list] = error.get("details")
        retry = (headers or {}).get("retry-after")
        self.retry_after: Optional[float] = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
        self.body = body
        where = f" [{self.field}]" if self.field else ""
        super().__init__(f"{status} {self.code}{where}: {self.message} (request_id={self.request_id})")


class InvalidRequestError(APIError):
    """422 (400 on the OpenAI routes): `field` and `limit` say what to change."""


class AuthenticationError(APIError):
    """401: no valid API key."""


class NotFoundError(APIError):
    """404: unknown model (`allowed` lists the served ones) or path."""


class RequestTimeoutError(APIError):
    """408: the request body did not arrive in time."""


class PayloadTooLargeError(APIError):
    """413: the request body is larger than the server accepts (`limit`)."""


class UnsupportedMediaTypeError(APIError):
    """415."""


class RateLimitError(APIError):
    """429: the key's rate limit, or the engine's queue, is full; see `retry_after`."""


class ServerError(APIError):
    """500: a server fault; quote `request_id`."""


class ServiceUnavailableError(APIError):
    """503: the inference backend is unavailable or the server is draining; retry."""


class DeadlineExceededError(APIError):
    """504: the request did not finish within its `timeout_s`."""


class StreamError(APIError):
    """An `error` event inside a stream (the request failed after it started)."""


_BY_STATUS = {400: InvalidRequestError, 401: AuthenticationError, 404: NotFoundError, 408: RequestTimeoutError,
              413: PayloadTooLargeError, 415: UnsupportedMediaTypeError, 422: InvalidRequestError,
              429: RateLimitError, 500: ServerError, 503: ServiceUnavailableError, 504: DeadlineExceededError}


def error_for(status: int, body: Any, headers: Optional[dict] = None) -> APIError:
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return cls(status, body, headers)
