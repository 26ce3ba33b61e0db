"""The gateway in front of the service, driven in-process (ASGI): routes, the error shape,
request ids, body limits, API keys, rate limits, CORS, draining."""

import asyncio
import hashlib
import json

import httpx
import pytest

from services.config import EdgeSettings, MemorySettings, Rate, Settings
from services.gateway import Gateway, Route, client_var, request_id_var

ROUTES = {
    "/livez": Route(frozenset({"GET"}), public=True, limited=False, drains=False),
    "/readyz": Route(frozenset({"GET"}), public=True, limited=False, drains=False, shaped=False),
    "/metrics": Route(frozenset({"GET"}), public=True, limited=False, drains=False),
    "/v1/echo": Route(frozenset({"POST"}), frozenset({"application/json"})),
    "/v1/models": Route(frozenset({"GET"})),
    "/v1/boom": Route(frozenset({"GET"})),
}


async def inner(scope, receive, send):
    """Echoes what it saw: body length, request id and client as the gateway set them."""
    if scope["path"] == "/v1/boom":
        raise RuntimeError("a bug")
    if scope["path"] == "/readyz" and (b"x-test-not-ready", b"1") in scope["headers"]:  # as BentoML answers
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Service is not ready"})
        return
    body = b""
    if scope["method"] == "POST":
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
    payload = json.dumps({"bytes": len(body), "request_id": request_id_var.get(), "client": client_var.get()})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload.encode()})


def make(memory: MemorySettings = MemorySettings(), **edge) -> Gateway:
    return Gateway(inner, Settings(edge=EdgeSettings(**edge), memory=memory), ROUTES)


def call(gateway, method, path, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=gateway)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kw)
    return asyncio.run(go())


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert error["request_id"] == r.headers["x-request-id"]
    return error


def held_echo_gateway() -> tuple[Gateway, asyncio.Event, asyncio.Event]:
    """A gateway whose /v1/echo waits, once started (first event), until released (second)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(scope, receive, send):
        if scope["path"] == "/v1/echo":
            started.set()
            await release.wait()
        await inner(scope, receive, send)

    return Gateway(slow, Settings(), ROUTES), started, release


def test_unknown_paths_and_methods_get_the_error_shape():
    g = make()
    assert_error(call(g, "GET", "/v1/nope"), 404, "not_found")
    r = call(g, "DELETE", "/v1/models")
    assert assert_error(r, 405, "method_not_allowed")["allowed"] == ["GET"]
    assert r.headers["allow"] == "GET"


def test_request_ids_are_echoed_or_fresh_per_request():
    g = make()
    assert call(g, "GET", "/v1/models", headers={"X-Request-ID": "abc-1"}).json()["request_id"] == "abc-1"
    ids = {call(g, "GET", "/v1/models").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
    bad = call(g, "GET", "/v1/models", headers={"X-Request-ID": "no spaces\tor tabs"})
    assert bad.headers["x-request-id"] != "no spaces\tor tabs"


def test_a_request_id_in_flight_is_not_given_to_a_second_request():
    """Two requests at once with one X-Request-ID: the second gets a fresh id (its answer says
    which); once the first has finished, the id may be used again."""
    g, started, release = held_echo_gateway()

    async def go():
        transport = httpx.ASGITransport(app=g)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            same = {"X-Request-ID": "job-7", "content-type": "application/json"}
            first = asyncio.create_task(client.post("/v1/echo", content=b"{}", headers=same))
            await started.wait()
            second = await client.get("/v1/models", headers=same)
            release.set()
            return (await first), second, await client.get("/v1/models", headers=same)

    first, second, later = asyncio.run(go())
    assert first.headers["x-request-id"] == first.json()["request_id"] == "job-7"
    assert second.headers["x-request-id"] == second.json()["request_id"] != "job-7"
    assert later.headers["x-request-id"] == "job-7"


def test_an_exception_in_the_app_is_a_500_in_the_error_shape():
    assert_error(call(make(), "GET", "/v1/boom"), 500, "internal_error")


def test_bodies_over_the_limit_are_refused_by_length_and_by_counting():
    g = make(max_body_bytes=2048)
    ok = call(g, "POST", "/v1/echo", content=b"x" * 2048, headers={"content-type": "application/json"})
    assert ok.json()["bytes"] == 2048
    r = call(g, "POST", "/v1/echo", content=b"x" * 2049, headers={"content-type": "application/json"})
    assert assert_error(r, 413, "body_too_large")["limit"] == 2048

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"x" * 1000
    r = call(g, "POST", "/v1/echo", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "body_too_large")


def test_a_body_that_stalls_is_refused_with_408():
    g = make(body_read_timeout_s=1)
    sent = []

    async def go():
        messages = [{"type": "http.request", "body": b"{", "more_body": True}]

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)  # the client never sends the rest

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/echo", "client": ("127.0.0.1", 1),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}
        await asyncio.wait_for(g(scope, receive, send), timeout=5)
    asyncio.run(go())
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]


def test_only_the_declared_content_types_are_accepted():
    g = make()
    r = call(g, "POST", "/v1/echo", content=b"{}", headers={"content-type": "text/plain"})
    assert assert_error(r, 415, "unsupported_media_type")["allowed"] == ["application/json"]
    assert call(g, "POST", "/v1/echo", content=b"{}",
                headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# comment\nplain-key-1\nsha256:" + hashlib.sha256(b"hashed-key-2").hexdigest() + "\n")
    return path


def test_api_keys_bearer_or_header_and_401_otherwise(keys_file):
    g = make(api_keys_file=keys_file)
    assert_error(call(g, "GET", "/v1/models"), 401, "unauthorized")
    assert_error(call(g, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    r = call(g, "GET", "/v1/models", headers={"Authorization": "Bearer plain-key-1"})
    assert r.status_code == 200 and r.json()["client"] == "key:" + hashlib.sha256(b"plain-key-1").hexdigest()[:12]
    assert call(g, "GET", "/v1/models", headers={"X-API-Key": "hashed-key-2"}).status_code == 200
    # Health stays open; metrics too, unless asked otherwise.
    assert call(g, "GET", "/livez").status_code == 200 and call(g, "GET", "/readyz").status_code == 200
    assert call(g, "GET", "/metrics").status_code == 200
    assert_error(call(make(api_keys_file=keys_file, metrics_require_key=True), "GET", "/metrics"),
                 401, "unauthorized")


def test_keys_rotate_without_a_restart(keys_file, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("services.auth.time.monotonic", lambda: now[0])
    g = make(api_keys_file=keys_file)
    headers = {"Authorization": "Bearer new-key"}
    assert call(g, "GET", "/v1/models", headers=headers).status_code == 401
    keys_file.write_text("new-key\n")
    now[0] += 2  # re-read at most once a second
    assert call(g, "GET", "/v1/models", headers=headers).status_code == 200
    assert call(g, "GET", "/v1/models", headers={"Authorization": "Bearer plain-key-1"}).status_code == 401


def test_keys_are_never_logged(keys_file, caplog):
    caplog.set_level("INFO")
    g = make(api_keys_file=keys_file)
    call(g, "GET", "/v1/models", headers={"Authorization": "Bearer plain-key-1"})
    call(g, "GET", "/v1/models", headers={"Authorization": "Bearer not-a-key"})
    assert "plain-key-1" not in caplog.text and "not-a-key" not in caplog.text


def test_rate_limit_per_client_with_retry_after(keys_file):
    g = make(api_keys_file=keys_file, rate_limit=Rate.parse("3/min"))
    first = {"Authorization": "Bearer plain-key-1"}
    assert [call(g, "GET", "/v1/models", headers=first).status_code for _ in range(3)] == [200] * 3
    r = call(g, "GET", "/v1/models", headers=first)
    assert assert_error(r, 429, "rate_limited")["limit"] == "3/min"
    assert 1 <= int(r.headers["retry-after"]) <= 20
    # Another key has its own bucket; health is never limited.
    assert call(g, "GET", "/v1/models", headers={"X-API-Key": "hashed-key-2"}).status_code == 200
    assert call(g, "GET", "/livez").status_code == 200


def test_cors_is_off_by_default_and_follows_the_allow_list():
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}
    off = make()
    assert "access-control-allow-origin" not in call(off, "GET", "/v1/models", headers={"Origin": "https://app.example"}).headers
    assert call(off, "OPTIONS", "/v1/echo", headers=preflight).status_code == 405
    on = make(cors_origins=("https://app.example",))
    r = call(on, "OPTIONS", "/v1/echo", headers=preflight)
    assert r.status_code == 204 and r.headers["access-control-allow-methods"] == "POST"
    assert r.headers["access-control-allow-headers"] == "content-type, authorization"
    r = call(on, "GET", "/v1/models", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    other = call(on, "GET", "/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_draining_refuses_new_work_but_not_health_or_metrics():
    g = make()
    g.draining = True
    r = call(g, "GET", "/v1/models")
    assert_error(r, 503, "shutting_down")
    assert r.headers["retry-after"] == "1"
    assert_error(call(g, "GET", "/readyz"), 503, "shutting_down")
    assert call(g, "GET", "/livez").status_code == 200 and call(g, "GET", "/metrics").status_code == 200


def test_a_readiness_check_that_fails_answers_in_the_error_shape_with_retry_after():
    r = call(make(), "GET", "/readyz", headers={"X-Test-Not-Ready": "1"})
    assert_error(r, 503, "not_ready")
    assert r.headers["retry-after"] == "1" and "Service is not ready" not in r.text
    assert call(make(), "GET", "/readyz").status_code == 200


def test_settings_parse_rates_and_refuse_nonsense(monkeypatch):
    assert Rate.parse("20/s").per_second == 20 and Rate.parse("600/min").per_second == 10
    for bad in ("20", "0/s", "x/s", "5/fortnight"):
        with pytest.raises(ValueError):
            Rate.parse(bad)
    monkeypatch.setenv("GENSERVE_RATE_LIMIT", "20/s")
    monkeypatch.setenv("GENSERVE_CORS_ORIGINS", "https://a.example/, https://b.example")
    s = Settings.from_env()
    assert s.edge.rate_limit == Rate(20, 1.0) and s.edge.cors_origins == ("https://a.example", "https://b.example")
    monkeypatch.setenv("GENSERVE_RATE_LIMIT", "lots")
    with pytest.raises(ValueError, match="GENSERVE_RATE_LIMIT"):
        Settings.from_env()


def test_client_text_cannot_forge_log_lines(caplog):
    caplog.set_level("INFO")
    forged = "2026-12-07T06:40:00+0000 [INFO] [cli] admin login ok"
    assert call(make(), "GET", f"/livez%0a{forged}%1b[2K%00%e2%80%a8").status_code == 404
    line = next(r.getMessage() for r in caplog.records if "GET /livez" in r.getMessage())
    assert "\n" not in line and "\x1b" not in line and "\x00" not in line and "\u2028" not in line
    assert f"/livez\\x0a{forged}\\x1b[2K\\x00\\u2028" in line


def test_failed_authentications_are_limited_per_address_and_then_valid_keys_wait_too(keys_file):
    now = [0.0]
    g = make(api_keys_file=keys_file, auth_failure_limit=Rate.parse("5/min"))
    g._auth_failures._clock = lambda: now[0]
    wrong = [call(g, "GET", "/v1/models", headers={"Authorization": f"Bearer guess-{i}"}) for i in range(8)]
    assert [r.status_code for r in wrong] == [401] * 5 + [429] * 3
    error = assert_error(wrong[-1], 429, "rate_limited")
    assert error["limit"] == "5/min" and 12 <= int(wrong[-1].headers["retry-after"]) <= 13
    # A right guess would stand out if it passed: it waits like the others.
    assert call(g, "GET", "/v1/models", headers={"Authorization": "Bearer plain-key-1"}).status_code == 429
    assert call(g, "GET", "/livez").status_code == 200  # health needs no key and is not limited
    now[0] += int(wrong[-1].headers["retry-after"])  # as told
    assert call(g, "GET", "/v1/models", headers={"Authorization": "Bearer plain-key-1"}).status_code == 200


def test_two_different_keys_in_one_request_are_refused(keys_file):
    g = make(api_keys_file=keys_file)
    twice = [(b"authorization", b"Bearer plain-key-1"), (b"authorization", b"Bearer hashed-key-2")]
    r = call(g, "GET", "/v1/models", headers=twice)
    assert assert_error(r, 400, "bad_request")["field"] == "Authorization"
    both = {"Authorization": "Bearer plain-key-1", "X-API-Key": "hashed-key-2"}
    assert_error(call(g, "GET", "/v1/models", headers=both), 400, "bad_request")
    same = {"Authorization": "Bearer plain-key-1", "X-API-Key": "plain-key-1"}
    assert call(g, "GET", "/v1/models", headers=same).status_code == 200


def test_with_cors_on_every_answer_varies_by_origin():
    on = make(cors_origins=("https://app.example",))
    for origin in ("https://app.example", "https://evil.example", None):
        r = call(on, "GET", "/v1/models", headers={"Origin": origin} if origin else {})
        assert r.headers["vary"] == "Origin", origin
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert call(on, "OPTIONS", "/v1/echo", headers=preflight).status_code == 405
    assert "vary" not in call(make(), "GET", "/v1/models").headers


@pytest.mark.parametrize("bad", ["", "# only a comment\n\n", "sha256:not-hex\n"])
def test_a_rotation_to_an_empty_or_malformed_file_keeps_the_old_keys(keys_file, monkeypatch, caplog, bad):
    now = [0.0]
    monkeypatch.setattr("services.auth.time.monotonic", lambda: now[0])
    g = make(api_keys_file=keys_file)
    keys_file.write_text(bad)  # caught half-written, or truncated by mistake
    now[0] += 2
    assert call(g, "GET", "/v1/models", headers={"Authorization": "Bearer plain-key-1"}).status_code == 200
    assert "keeping the 2 keys read before" in caplog.text
    keys_file.write_text("rotated-key\n")  # the finished file takes over
    now[0] += 2
    assert call(g, "GET", "/v1/models", headers={"Authorization": "Bearer rotated-key"}).status_code == 200
    assert call(g, "GET", "/v1/models", headers={"Authorization": "Bearer plain-key-1"}).status_code == 401
    with pytest.raises(ValueError, match="GENSERVE_API_KEYS_FILE"):  # at start-up, each is an error
        keys_file.write_text(bad)
        make(api_keys_file=keys_file)


def test_new_work_is_refused_near_the_memory_limit():
    """GENSERVE_MEMORY_LIMIT_MB: past it a body-bearing request gets 503 with Retry-After
    before its body is read (the pod is not OOM-killed); health and reads stay up."""
    from services.memory import MemoryGuard

    gateway = make(memory=MemorySettings(limit_mb=100))
    used = {"rss": 50 << 20}
    gateway.memory = MemoryGuard(100 << 20, read_rss=lambda: used["rss"])
    assert call(gateway, "POST", "/v1/echo", json={"a": 1}).status_code == 200
    # A body that would carry it past the limit, then any body once it is past.
    error = assert_error(call(gateway, "POST", "/v1/echo", content=b"x" * (60 << 20),
                              headers={"content-type": "application/json"}), 503, "memory_limit")
    assert "GENSERVE_MEMORY_LIMIT_MB" in error["message"] and error["limit"] == 100
    used["rss"] = 101 << 20
    r = call(gateway, "POST", "/v1/echo", json={"a": 1})
    assert_error(r, 503, "memory_limit")
    assert r.headers["retry-after"] == "2"
    assert call(gateway, "GET", "/livez").status_code == 200
    assert call(gateway, "GET", "/v1/models").status_code == 200
    used["rss"] = 60 << 20  # work ended: admitted again
    assert call(gateway, "POST", "/v1/echo", json={"a": 1}).status_code == 200


def test_the_memory_limit_defaults_to_a_share_of_the_container_limit(tmp_path):
    from services.memory import CONTAINER_SHARE, default_limit_mb

    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    assert default_limit_mb((v2, v1)) == 0  # no cgroup files: off
    v2.write_text("max\n")
    assert default_limit_mb((v2, v1)) == 0  # no limit
    v2.write_text(f"{4 << 30}\n")
    assert default_limit_mb((v2, v1)) == int((4 << 30) * CONTAINER_SHARE) >> 20
    v2.unlink()
    v1.write_text(f"{2 << 30}\n")
    assert default_limit_mb((v2, v1)) == int((2 << 30) * CONTAINER_SHARE) >> 20
    v1.write_text("9223372036854771712\n")  # cgroup v1's "unlimited"
    assert default_limit_mb((v2, v1)) == 0
