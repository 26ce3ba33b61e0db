"""The public edge: one ASGI layer in front of everything BentoML and the /v1 app serve.

Every HTTP request passes here first, in this order, and anything refused is refused
before any work and in the one error shape, with a request id:
  1. request id      the caller's X-Request-ID (if sane) or a new one; echoed, logged
  2. route           only known paths and methods go on (404/405 here, so clients
                     cannot grow /metrics with made-up paths)
  3. shutdown        after SIGTERM: 503 for new work, /readyz 503, in-flight requests finish
  4. API key         GENSERVE_API_KEYS_FILE; 401 without a valid key, 400 for two different
                     keys in one request; past GENSERVE_AUTH_FAILURE_LIMIT failures from one
                     client address, 429 for its keyed requests until the bucket refills
  5. rate limit      GENSERVE_RATE_LIMIT per key (per client address without keys); 429
  5b. memory         GENSERVE_MEMORY_LIMIT_MB: work (a body) refused with 503 near the limit
  6. body            content type (415), size by Content-Length and by counting (413),
                     read deadline (408); the body is read here and replayed to the app
  7. CORS            GENSERVE_CORS_ORIGINS allow-list, preflights answered here
Anything the app raises past its own handlers becomes a 500 in the same shape. What a
client sent (a path holding %0a, ESC or NUL) is logged escaped: it cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.auth import KeyStore, presented_keys
from services.config import Settings
from services.memory import RETRY_AFTER_S, MemoryGuard, collect_cycles, trim
from services.ratelimit import RateLimiter, retry_after

if TYPE_CHECKING:
    from starlette.types import ASGIApp

log = logging.getLogger("genserve")

# Control characters (C0, DEL, C1), Unicode line breaks, and the backslash that escapes them.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")


def printable(text: str) -> str:
    """`text` on one line: control characters as \\xNN or \\uNNNN, backslashes doubled."""
    def escape(m: re.Match) -> str:
        char = m.group()
        return "\\\\" if char == "\\" else f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    return _UNPRINTABLE.sub(escape, text)


class _PrintableArguments(logging.Filter):
    """The text arguments of every genserve log record (and exceptions, as text), printable:
    client text reaches the log through them (paths, names), never as the format string."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(printable(str(a)) if isinstance(a, (str, BaseException)) else a
                                for a in record.args)
        return True


log.addFilter(_PrintableArguments())

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# Who is asking: "key:<id>" with API keys, "addr:<ip>" without; rate limits are per client.
client_var: contextvars.ContextVar[str] = contextvars.ContextVar("client", default="anonymous")

BODY_METHODS = {"POST", "PUT", "PATCH"}
# After a request whose body was at least this large, its copies (body, parsed JSON, decoded
# image) are collected even where a reference cycle holds them (services.memory.collect_cycles)
# and the freed memory goes back to the system (services.memory.trim), which glibc would keep
# (a soak of 20 MB bodies on 8 connections held ~200 MB after the load).
TRIM_AFTER_BODY_BYTES = 1024 * 1024
CORS_ALLOWED_HEADERS = ("authorization", "content-type", "x-api-key", "x-request-id")
CORS_EXPOSED_HEADERS = "X-Request-ID, Retry-After"


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    content_types: frozenset[str] = frozenset()  # bodies accepted (POST)
    public: bool = False  # reachable without an API key
    limited: bool = True  # counts against the request rate limit
    drains: bool = True  # refused while shutting down (health and metrics stay up)
    shaped: bool = True  # the app answers errors in the one shape (BentoML's own routes answer plain text)
    admin_methods: frozenset[str] = frozenset()  # operators' methods: admin keys only, when there are some


def error_body(status: int, code: str, message: str, **extra) -> dict:
    error = {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}
    error["request_id"] = request_id_var.get()
    return {"error": error}


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, **extra):
        self.status, self.code, self.message = status, code, message
        self.headers, self.extra = headers or {}, extra


@dataclass
class Gateway:
    app: ASGIApp
    settings: Settings
    routes: dict[str, Route]
    keys: KeyStore | None = None
    admin_keys: KeyStore | None = None  # GENSERVE_ADMIN_KEYS_FILE: the only keys of operators' methods
    draining: bool = False
    inflight: int = 0
    on_error: Callable[[str, str], None] | None = None  # (endpoint, code): counts refusals
    on_rate_limited: Callable[[str, str], None] | None = None  # (client, limit): counts rate-limit refusals
    _limiter: RateLimiter | None = field(default=None, repr=False)
    _auth_failures: RateLimiter | None = field(default=None, repr=False)  # per client address
    memory: MemoryGuard = field(init=False, repr=False)  # from settings.memory_limit_mb
    _request_ids: set[str] = field(default_factory=set, repr=False)  # of the requests in flight

    def __post_init__(self):
        if self.settings.edge.api_keys_file is not None:
            self.keys = KeyStore(self.settings.edge.api_keys_file)
            if self.settings.edge.auth_failure_limit is not None:
                self._auth_failures = RateLimiter(self.settings.edge.auth_failure_limit)
        else:
            log.warning("API keys are off (GENSERVE_API_KEYS_FILE is not set): every client is served")
        if self.settings.edge.admin_keys_file is not None:
            self.admin_keys = KeyStore(self.settings.edge.admin_keys_file, variable="GENSERVE_ADMIN_KEYS_FILE")
            if self._auth_failures is None and self.settings.edge.auth_failure_limit is not None:
                self._auth_failures = RateLimiter(self.settings.edge.auth_failure_limit)
        if self.settings.edge.rate_limit is not None:
            self._limiter = RateLimiter(self.settings.edge.rate_limit)
        self.memory = MemoryGuard(self.settings.memory.limit_mb << 20)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            self._install_sigterm_drain()
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # Each request runs in a context of its own. uvicorn (asyncio loop, no reset_contextvars)
        # starts the next request on a kept-alive connection from inside the previous one's task
        # (cpython#140947), so every request's context inherited the last one's context
        # variables: BentoML's current Request, which holds the body, chained request after
        # request (+6.7 MB of RSS per 6.7 MB body, for the life of the connection).
        return await asyncio.get_running_loop().create_task(self._serve_http(scope, receive, send),
                                                            context=contextvars.Context())

    async def _serve_http(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get(REQUEST_ID_HEADER, "")
        # The caller's id, unless malformed or already naming a request in flight (one id, one
        # request in the logs): then a fresh one, which the answer's X-Request-ID says.
        fresh = not _VALID_REQUEST_ID.match(given) or given in self._request_ids
        request_id = uuid.uuid4().hex if fresh else given
        self._request_ids.add(request_id)
        token = request_id_var.set(request_id)
        cors = self._cors_headers(headers)
        state = {"status": 0}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                extra = [(REQUEST_ID_HEADER.encode(), request_id.encode())]
                extra += [(k.encode(), v.encode()) for k, v in cors.items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        start = time.perf_counter()
        try:
            await self._handle(scope, receive, send_with_id, headers, cors)
        except _Refused as r:
            await self._refuse(scope, send_with_id, r)
        except Exception:
            log.exception("request_id=%s unexpected error", request_id)
            if not state["status"]:
                await self._refuse(scope, send_with_id, _Refused(
                    500, "internal_error", "unexpected server error; the request id is in the server log"))
        finally:
            log.info("request_id=%s %s %s -> %s in %.3fs", request_id, scope["method"], scope["path"],
                     state["status"], time.perf_counter() - start)
            request_id_var.reset(token)
            self._request_ids.discard(request_id)

    # -- the checks, in order ----------------------------------------------------------
    async def _handle(self, scope, receive, send, headers, cors):
        path, method = scope["path"], scope["method"]
        route = self.routes.get(path)
        if route is None:
            raise _Refused(404, "not_found", f"no endpoint at {path}; the API is described at /v1/docs")
        allowed_origin = "access-control-allow-origin" in cors
        if method == "OPTIONS" and "access-control-request-method" in headers and allowed_origin:
            return await self._preflight(send, route, headers)
        if method not in route.methods and not (method == "HEAD" and "GET" in route.methods):
            allow = ", ".join(sorted(route.methods))
            raise _Refused(405, "method_not_allowed", f"{path} accepts {allow}, not {method}",
                           headers={"Allow": allow}, allowed=sorted(route.methods))
        if self.draining and (route.drains or path == "/readyz"):
            raise _Refused(503, "shutting_down", "this server is shutting down; retry (another replica answers)",
                           headers={"Retry-After": "1", "Connection": "close"})
        client = self._authenticate(scope, route)
        if route.limited and self._limiter is not None:
            wait = self._limiter.acquire(client)
            if wait > 0:
                if self.on_rate_limited is not None:
                    self.on_rate_limited(client, "requests")
                raise _Refused(429, "rate_limited",
                               f"more than {self.settings.edge.rate_limit} requests; retry in {retry_after(wait)}s",
                               headers={"Retry-After": str(retry_after(wait))},
                               limit=str(self.settings.edge.rate_limit))
        large = False
        if method in BODY_METHODS:
            self._check_memory(headers)
            body = await self._read_body(scope, receive, route, headers)
            if body is None:
                return  # the client went away while sending
            large = len(body) >= TRIM_AFTER_BODY_BYTES
            receive = _replay(body, receive)
            del body
        client_token = client_var.set(client)
        self.inflight += route.drains
        try:
            await (self.app if route.shaped else self._shape_errors)(scope, receive, send)
        finally:
            self.inflight -= route.drains
            client_var.reset(client_token)
        if large:  # answered: its copies are garbage now
            del receive
            collect_cycles()
            await asyncio.to_thread(trim)

    def _authenticate(self, scope, route: Route) -> str:
        address = f"addr:{(scope.get('client') or ('unknown', 0))[0]}"
        admin = self.admin_keys is not None and scope["method"] in route.admin_methods
        needs_key = not route.public or (scope["path"] == "/metrics" and self.settings.edge.metrics_require_key)
        store = self.admin_keys if admin else self.keys
        if store is None or not needs_key:
            return address
        if self._auth_failures is not None and (wait := self._auth_failures.wait(address)) > 0:
            # Valid keys wait too: otherwise a guess that is right would still stand out.
            if self.on_rate_limited is not None:
                self.on_rate_limited(address, "auth_failures")
            limit = self.settings.edge.auth_failure_limit
            raise _Refused(429, "rate_limited", f"more than {limit} failed authentications from this address; "
                           f"retry in {retry_after(wait)}s", headers={"Retry-After": str(retry_after(wait))},
                           limit=str(limit))
        keys = presented_keys(scope["headers"])
        if len(set(keys)) > 1:  # which one would count is a guess: refuse rather than pick
            raise _Refused(400, "bad_request", "send one API key, in one `Authorization` or `X-API-Key` header",
                           field="Authorization")
        presented = keys[0] if keys else None
        kid = None if presented is None else store.identify(presented)
        if kid is None:
            if self._auth_failures is not None:
                self._auth_failures.acquire(address)
            if admin and presented is not None and self.keys is not None and self.keys.identify(presented):
                raise _Refused(403, "forbidden", f"{scope['method']} {scope['path']} needs an admin key "
                               "(GENSERVE_ADMIN_KEYS_FILE)")
            if presented is None:
                raise _Refused(401, "unauthorized", "an API key is required: send `Authorization: Bearer <key>` "
                               "or `X-API-Key: <key>`", headers={"WWW-Authenticate": "Bearer"})
            raise _Refused(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        return f"key:{kid}"

    def _check_memory(self, headers) -> None:
        """GENSERVE_MEMORY_LIMIT_MB: new work is refused before its body is read while the
        worker's RSS and the body would pass it (the body is counted once more as it is read)."""
        length = headers.get("content-length", "")
        announced = int(length) if length.isdigit() else 0
        if not self.memory.admits(announced):
            raise _Refused(503, "memory_limit", self.memory.refusal("this request", announced),
                           headers={"Retry-After": str(RETRY_AFTER_S)}, limit=self.settings.memory.limit_mb)

    async def _read_body(self, scope, receive, route: Route, headers) -> bytes | None:
        limit = self.settings.edge.max_body_bytes
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        length = headers.get("content-length")
        if route.content_types and content_type not in route.content_types and (content_type or length not in
                                                                                 (None, "0")):
            raise _Refused(415, "unsupported_media_type",
                           f"Content-Type must be one of {', '.join(sorted(route.content_types))}, "
                           f"got {content_type or 'none'}", field="Content-Type", allowed=sorted(route.content_types))
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise _Refused(413, "body_too_large", f"the request body may be at most {limit} bytes",
                           headers={"Connection": "close"}, limit=limit)
        chunks, total = [], 0
        deadline = time.monotonic() + self.settings.edge.body_read_timeout_s
        while True:
            try:  # asyncio.timeout, not wait_for: no task per message (Python 3.11's wait_for makes one)
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise _Refused(408, "request_timeout", f"the request body did not arrive within "
                               f"{self.settings.edge.body_read_timeout_s}s", headers={"Connection": "close"},
                               limit=self.settings.edge.body_read_timeout_s) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise _Refused(413, "body_too_large", f"the request body may be at most {limit} bytes",
                               headers={"Connection": "close"}, limit=limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _shape_errors(self, scope, receive, send):
        """BentoML answers its own routes' errors (a /readyz that is not ready) in plain text:
        they leave in the one error shape instead."""
        failed = 0

        async def send_or_hold(message):
            nonlocal failed
            if message["type"] == "http.response.start" and message["status"] >= 400:
                failed = message["status"]
            if not failed:
                await send(message)

        await self.app(scope, receive, send_or_hold)
        if failed == 503:
            raise _Refused(503, "not_ready", "the service is not ready (starting, or its backend is unavailable); "
                           "retry", headers={"Retry-After": "1"})
        if failed:
            raise _Refused(500, "internal_error", f"{scope['path']} failed; the request id is in the server log")

    # -- CORS ----------------------------------------------------------------------------
    def _cors_headers(self, headers) -> dict[str, str]:
        origin = headers.get("origin")
        allowed = self.settings.edge.cors_origins
        if not allowed:
            return {}
        if not origin or not (origin in allowed or "*" in allowed):
            return {"vary": "Origin"}  # the answer depends on Origin: caches must keep them apart
        return {"access-control-allow-origin": origin, "vary": "Origin",
                "access-control-expose-headers": CORS_EXPOSED_HEADERS}

    async def _preflight(self, send, route: Route, headers):
        asked = [h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",") if h.strip()]
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-methods", ", ".join(sorted(route.methods)).encode()),
            (b"access-control-allow-headers", ", ".join(h for h in asked if h in CORS_ALLOWED_HEADERS).encode()),
            (b"access-control-max-age", b"600")]})
        await send({"type": "http.response.body", "body": b""})

    # -- answers -------------------------------------------------------------------------
    async def _refuse(self, scope, send, r: _Refused):
        if self.on_error is not None:
            route = scope["path"] if scope["path"] in self.routes else "unmatched"
            self.on_error(route, r.code)
        if r.status == 500:
            log.error("request_id=%s %s: %s", request_id_var.get(), r.code, r.message)
        body = json.dumps(error_body(r.status, r.code, r.message, **r.extra)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in r.headers.items()]
        await send({"type": "http.response.start", "status": r.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- graceful shutdown ---------------------------------------------------------------
    def _install_sigterm_drain(self) -> None:
        """On SIGTERM: stop admitting at once, let in-flight requests finish (at most
        GENSERVE_SHUTDOWN_GRACE_S), then hand the signal to the server (uvicorn), which
        closes the listener and exits. Installed at lifespan start, over uvicorn's handler."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return
        loop = asyncio.get_running_loop()

        def on_sigterm(sig, frame):
            if self.draining:
                return
            self.draining = True
            log.info("SIGTERM: draining %d requests in flight (at most %ss)", self.inflight,
                     self.settings.edge.shutdown_grace_s)
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then(previous, sig, frame)))

        signal.signal(signal.SIGTERM, on_sigterm)

    async def _drain_then(self, previous, sig, frame) -> None:
        deadline = time.monotonic() + self.settings.edge.shutdown_grace_s
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained (%d requests still in flight); shutting down", self.inflight)
        previous(sig, frame)


def _replay(body: bytes, receive):
    """The body read by the gateway, then the real channel (for disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
