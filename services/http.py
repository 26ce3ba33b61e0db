"""HTTP plumbing of the /v1 app: bodies, server-sent events and the one error shape.
(Request ids, limits and keys are the gateway's: services.gateway.)"""

import logging
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from services.errors import (
    AdapterNotFound,
    BackendUnavailable,
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    ServiceError,
    TooManyRequests,
)
from services.gateway import request_id_var

log = logging.getLogger("genserve")

M = TypeVar("M", bound=BaseModel)

# Multipart limits: a form holds a few fields and at most two images.
MAX_FORM_FIELDS = 64
MAX_FORM_FILES = 2
MAX_FORM_FIELD_BYTES = 1024 * 1024

# Status -> error code for errors raised by the framework itself (Starlette/FastAPI).
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
              415: "unsupported_media_type"}

# pydantic error-context keys that carry the limit a value broke.
_LIMIT_KEYS = ("le", "ge", "lt", "gt", "max_length", "min_length", "expected")


class EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the stream ends: finished, or the
    client hung up. Starlette stops sending on a disconnect but leaves the generator to
    the garbage collector, which could run its cleanup much later. A disconnect calls
    `on_close` the moment it is read, not when Starlette's cancellation of the sending task
    lands: anyio skips a task whose wake-up is already due, and a generator fed an event on
    every loop pass (the engine's steps, run inline for a lone request) is always due, so
    the cancellation waited for the end of the request."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        async def watched():  # Starlette listens for the disconnect below ASGI 2.4 (uvicorn: 2.3)
            message = await receive()
            if message["type"] == "http.disconnect":
                self.on_close()
            return message

        try:
            await super().__call__(scope, watched, send)
        finally:
            self.on_close()
            await self.body_iterator.aclose()


async def parse_body(request: Request, model: type[M]) -> M:
    """A JSON body (strict types, images as base64) or a multipart form (form fields are
    text, so their types are coerced; image files are base64-encoded for the model).
    Validation errors surface exactly as for a typed FastAPI body."""
    import base64
    import json

    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS,
                                      max_part_size=MAX_FORM_FIELD_BYTES)
            fields = {}
            for key, value in form.multi_items():
                # `image[]` is array syntax (OpenAI's SDK sends its files so): one value here. A field
                # given twice is refused: a form would otherwise keep one of them silently.
                key = key[:-2] if key.endswith("[]") else key
                if key in fields:
                    raise RequestValidationError([{"loc": ("body", key), "type": "value_error",
                                                   "msg": f"{key} is given more than once: send one"}])
                if hasattr(value, "read"):  # an uploaded file
                    fields[key] = base64.b64encode(await value.read()).decode("ascii")
                else:
                    fields[key] = value
            return model.model_validate(fields, strict=False)
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise RequestValidationError([{"loc": ("body",), "msg": "body is not valid JSON (UTF-8, "
                                           "nested at most a few hundred levels)", "type": "json_invalid"}]) from None
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _field(loc, kind=None) -> str:
    if kind == "json_invalid":  # its loc holds the character offset, not a field
        return "body"
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _validation_body(exc: RequestValidationError, request_id: str) -> dict:
    details = []
    for err in exc.errors():
        item = {"field": _field(err.get("loc", ()), err.get("type")), "message": err.get("msg", "invalid value"),
                "type": err.get("type")}
        ctx = err.get("ctx") or {}
        for key in _LIMIT_KEYS:
            if key in ctx:
                item["limit"] = ctx[key] if isinstance(ctx[key], (int, float, str)) else str(ctx[key])
                break
        details.append(item)
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    error = {"code": "invalid_request", "message": f"{first['field']}: {first['message']}",
             "field": first["field"], "details": details, "request_id": request_id}
    if "limit" in first:
        error["limit"] = first["limit"]
    return {"error": error}


# Each domain error's HTTP status (services.errors); a subclass has its nearest listed base's.
STATUS: dict[type[ServiceError], int] = {
    InvalidRequest: 422, ModelNotFound: 404, AdapterNotFound: 404, RateLimited: 429, TooManyRequests: 429,
    ClientDisconnected: 499,
    InferenceFailed: 500, BackendUnavailable: 503, DeadlineExceeded: 504, ServiceError: 500,
}


def http_status(exc: ServiceError) -> int:
    return next(STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS)


def log_fault(exc: ServiceError) -> None:
    """A server-side failure (5xx) goes to the log with its detail; the client sees the message."""
    if http_status(exc) >= 500:
        log.error("request_id=%s %s: %s", request_id_var.get(), exc.code, exc)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Every failure leaves as {"error": {...}}; `on_error(path, code)` counts them."""

    def respond(request: Request, status: int, code: str, body: dict, headers=None) -> JSONResponse:
        if on_error is not None:
            on_error(request.url.path, code)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return respond(request, 422, "invalid_request", _validation_body(exc, request_id_var.get()))

    @app.exception_handler(HTTPException)
    async def _framework_error(request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400:  # a body the framework could not parse (encoding, form limits)
            error = RequestValidationError([{"loc": ("body",), "msg": message, "type": "body_invalid"}])
            return respond(request, 422, "invalid_request", _validation_body(error, request_id_var.get()))
        code = HTTP_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal_error")
        body = {"error": {"code": code, "message": message, "request_id": request_id_var.get()}}
        return respond(request, exc.status_code, code, body, getattr(exc, "headers", None))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        log_fault(exc)
        return respond(request, http_status(exc), exc.code, exc.body(request_id_var.get()), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("request_id=%s unexpected error", request_id_var.get())
        body = {"error": {"code": "internal_error", "request_id": request_id_var.get(),
                          "message": "unexpected server error; the request id is in the server log"}}
        return respond(request, 500, "internal_error", body)
