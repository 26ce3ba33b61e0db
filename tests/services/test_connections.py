"""Connection settings handed to uvicorn (services.connections): which proxies' X-Forwarded-For
is believed. The connection deadlines and caps are tested over real sockets in test_edge."""

import asyncio
import os

import pytest
import uvicorn.config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from services import connections
from services.config import Settings


def client_seen(trusted: str, peer: str, forwarded_for: str) -> str:
    """The client address the app sees behind uvicorn's proxy-headers middleware."""
    seen = {}

    async def app(scope, receive, send):
        seen["client"] = scope["client"][0]

    scope = {"type": "http", "client": (peer, 1234), "headers": [(b"x-forwarded-for", forwarded_for.encode())]}
    asyncio.run(ProxyHeadersMiddleware(app, trusted_hosts=trusted)(scope, None, None))
    return seen["client"]


@pytest.fixture
def installed(monkeypatch):
    """install() as the worker runs it, undone afterwards."""
    monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, "auto", uvicorn.config.HTTP_PROTOCOLS["auto"])
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")  # restored by monkeypatch
    for attribute in ("settings", "trusted"):
        monkeypatch.setattr(connections.EdgeProtocol, attribute, getattr(connections.EdgeProtocol, attribute))

    def install(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        connections.install(Settings.from_env())
        return os.environ["FORWARDED_ALLOW_IPS"]
    return install


def test_forwarded_for_is_believed_from_no_one_by_default(installed, monkeypatch):
    monkeypatch.delenv("GENSERVE_TRUSTED_PROXIES", raising=False)
    trusted = installed()
    assert client_seen(trusted, "127.0.0.1", "203.0.113.9") == "127.0.0.1"
    assert uvicorn.config.HTTP_PROTOCOLS["auto"] == "services.connections:EdgeProtocol"


def test_forwarded_for_is_believed_from_the_configured_proxies(installed):
    trusted = installed(GENSERVE_TRUSTED_PROXIES="10.1.2.3/8, 192.168.0.7")
    assert client_seen(trusted, "10.9.9.9", "203.0.113.9") == "203.0.113.9"
    assert client_seen(trusted, "192.168.0.7", "198.51.100.1, 10.0.0.5") == "198.51.100.1"  # proxies skipped
    assert client_seen(trusted, "127.0.0.1", "203.0.113.9") == "127.0.0.1"
    assert connections.EdgeProtocol._trusted(connections.EdgeProtocol, "10.200.0.1")  # no connection cap
    assert not connections.EdgeProtocol._trusted(connections.EdgeProtocol, "127.0.0.1")


def test_trusted_proxies_must_be_addresses_or_networks(monkeypatch):
    for bad in ("*", "proxy.local", "10.0.0.0/33"):
        monkeypatch.setenv("GENSERVE_TRUSTED_PROXIES", bad)
        with pytest.raises(ValueError, match="GENSERVE_TRUSTED_PROXIES"):
            Settings.from_env()
