"""Connections, below HTTP requests: what uvicorn, as BentoML starts it, leaves unbounded.

uvicorn closes a kept-alive connection that stays idle for `timeout_keep_alive`, but only
after a response, and any byte cancels that timer: a connection that sends nothing, or one
header line every few seconds, was held as long as the client liked (300 such connections
were bounded by nothing but the file-descriptor limit). uvicorn also trusts
X-Forwarded-For from 127.0.0.1 unless told otherwise, so any local client could pick the
address its per-address limits counted. `EdgeProtocol` (uvicorn's h11 protocol, extended)
and `install` bound them:

- a request's head (request line and headers) must arrive in full within
  GENSERVE_HEADER_TIMEOUT_S of the connection opening or of the previous response: else 408
  if part of it came, and the connection closes;
- an idle kept-alive connection closes after GENSERVE_KEEP_ALIVE_TIMEOUT_S;
- one client address holds at most GENSERVE_MAX_CONNECTIONS_PER_CLIENT connections: past
  it, 429 and close (trusted proxies carry many clients and are not capped);
- a head over h11's limit (16 KiB) is a 431 (uvicorn answered 400 and closed while the
  client was still sending, so the client saw a reset, not the answer);
- X-Forwarded-For is believed from GENSERVE_TRUSTED_PROXIES only (none by default).

Answers sent here, before any request exists, use the one error shape and close; the
connection then reads and drops what the client still sends for a moment (a lingering
close), so the answer is not lost to a reset.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import uuid
from collections import Counter
from http import HTTPStatus
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

from services.config import Settings

LINGER_S = 2.0  # how long a refused connection reads and drops before closing
_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 finds the end of a head


def _networks(items) -> list:
    return [ipaddress.ip_network(item, strict=False) for item in items]


class EdgeProtocol(H11Protocol):
    settings = Settings()  # set by install()
    trusted = _networks(())
    open_per_address: ClassVar[Counter[str]] = Counter()  # this process's connections by client address

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.settings.edge.keep_alive_timeout_s
        self.max_head_bytes = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        self._address: str | None = None  # counted against the per-address cap
        self._head_deadline = None
        self._answered = False  # an answer of ours went out: read and drop until closed

    # -- connection life -----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        cap = self.settings.edge.max_connections_per_client
        if host is not None and cap > 0 and not self._trusted(host):
            if self.open_per_address[host] >= cap:
                return self._answer(429, "too_many_connections", f"at most {cap} connections per client "
                                    "address; close some, or retry", {"Retry-After": "1"}, limit=cap)
            self._address = host
            self.open_per_address[host] += 1
        self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        if self._address is not None:
            self.open_per_address[self._address] -= 1
            if self.open_per_address[self._address] <= 0:
                del self.open_per_address[self._address]
            self._address = None
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        self._unset_keepalive_if_required()
        self.conn.receive_data(data)
        if self.conn.their_state is h11.IDLE:  # a head on its way: refused past h11's limit, as 431
            pending = self.conn.trailing_data[0]
            if len(pending) > self.max_head_bytes and not _HEAD_END.search(pending, 0, self.max_head_bytes + 3):
                return self._answer(431, "headers_too_large", f"the request line and headers may be at most "
                                    f"{self.max_head_bytes} bytes", limit=self.max_head_bytes)
        self.handle_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()  # the next head has its own deadline

    # -- the head deadline -----------------------------------------------------------------
    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.settings.edge.header_timeout_s, self._head_overdue)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # a request is being served; its body has the gateway's own deadline
        if self.conn.trailing_data[0]:
            self._answer(408, "request_timeout", f"the request line and headers did not arrive within "
                         f"{self.settings.edge.header_timeout_s}s", limit=self.settings.edge.header_timeout_s)
        else:
            self.transport.close()

    # -- answers before any request ------------------------------------------------------------
    def _answer(self, status: int, code: str, message: str, headers: dict | None = None, **extra) -> None:
        request_id = uuid.uuid4().hex
        body = json.dumps({"error": {"code": code, "message": message, **extra, "request_id": request_id}}).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", f"x-request-id: {request_id}", "connection: close",
                *(f"{k.lower()}: {v}" for k, v in (headers or {}).items())]
        self._answered = True
        self._cancel_head_deadline()
        self._unset_keepalive_if_required()
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # our side is done; theirs may still be sending
        self.loop.call_later(LINGER_S, self.transport.close)

    def _trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)


def install(settings: Settings) -> None:
    """In the worker, before BentoML builds uvicorn's Config: uvicorn's HTTP protocol becomes
    EdgeProtocol (BentoML passes no protocol option, so its "auto" entry is replaced), and
    X-Forwarded-For is believed from the configured proxies only."""
    import uvicorn.config

    EdgeProtocol.settings = settings
    EdgeProtocol.trusted = _networks(settings.edge.trusted_proxies)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:EdgeProtocol"
    # uvicorn's ProxyHeadersMiddleware reads this when the Config is built; "" trusts nobody.
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(settings.edge.trusted_proxies)
