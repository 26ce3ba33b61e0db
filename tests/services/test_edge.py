"""The public edge over real HTTP, as an outside probe found it: metrics per server,
start-up failures, connections, forwarded addresses, logs."""

import re
import socket
import time

import httpx
import pytest

from loadtests.slowloris import hold
from tests.conftest import running_server
from tests.fixtures.local_server import LocalServer

pytestmark = pytest.mark.server


def images_generated(metrics: str) -> float:
    """genserve_images_generated_total summed over its series."""
    return sum(float(m) for m in re.findall(r"^genserve_images_generated_total\{[^}]*\} (\S+)$", metrics, re.M))


def test_two_servers_on_one_host_keep_their_own_metrics(repository, tmp_path):
    """Same BENTOML_HOME (BentoML's shared multiprocess directory) and the same temp dir:
    the second server's start must not wipe the first's series, nor mix them."""
    home, tmp = tmp_path / "bentoml", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    env = {"GENSERVE_MODEL_REPOSITORY": str(repository), "BENTOML_HOME": str(home), "TMPDIR": str(tmp)}
    first = LocalServer(env, tmp_path / "first.log")
    second = None
    try:
        first.wait_ready()
        for seed in range(3):
            r = httpx.post(f"{first.url}/v1/gan/generate", json={"seed": seed, "num_images": 2}, timeout=60)
            assert r.status_code == 200, r.text
        assert images_generated(httpx.get(f"{first.url}/metrics").text) == 6
        second = LocalServer(env, tmp_path / "second.log")
        second.wait_ready()
        r = httpx.post(f"{second.url}/v1/gan/generate", json={"seed": 9, "num_images": 1}, timeout=60)
        assert r.status_code == 200, r.text
        assert images_generated(httpx.get(f"{first.url}/metrics").text) == 6
        assert images_generated(httpx.get(f"{second.url}/metrics").text) == 1
        assert len(list((tmp / "genserve-metrics").iterdir())) == 2  # one directory per server
        first.stop()
        assert len(list((tmp / "genserve-metrics").iterdir())) == 1  # removed by the server that stopped
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert list((tmp / "genserve-metrics").iterdir()) == []


# -- a server with keys, short connection deadlines and a small per-address cap ------------
KEY = "edge-test-key"
HEADER_TIMEOUT_S, CONNECTIONS_PER_ADDRESS = 2, 24


@pytest.fixture(scope="module")
def edge(repository, tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge")
    keys = folder / "keys.txt"
    keys.write_text(KEY + "\n")
    yield from running_server({
        "GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_API_KEYS_FILE": str(keys),
        "GENSERVE_AUTH_FAILURE_LIMIT": "5/min", "GENSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "GENSERVE_MAX_CONNECTIONS_PER_CLIENT": str(CONNECTIONS_PER_ADDRESS), "GENSERVE_KEEP_ALIVE_TIMEOUT_S": "1",
    }, folder)


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_slowloris_connections_are_closed_past_the_header_timeout(edge):
    """Half of them send one header line every 0.5 s, half send nothing: all are closed once
    the head deadline passes, the slow ones with a 408."""
    slow = [connect(edge) for _ in range(10)]
    silent = [connect(edge) for _ in range(10)]
    answers, still_open, held = hold(slow, silent, every_s=0.5, seconds=4 * HEADER_TIMEOUT_S)
    for s in answers:
        s.close()
    assert not still_open, f"{still_open} of 20 connections still open after {held:.1f}s"
    assert held < HEADER_TIMEOUT_S + 3
    assert all(answers[s].startswith(b"HTTP/1.1 408") for s in slow), [answers[s][:40] for s in slow]
    assert all(answers[s] == b"" for s in silent)
    assert httpx.get(f"{edge.url}/livez").status_code == 200


def read_response(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"content-length: (\d+)", data, re.I).group(1)):
        data += s.recv(4096)
    return data


def test_kept_alive_connections_close_when_idle_and_each_head_has_its_deadline(edge):
    request = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(edge) as idle:
        idle.sendall(request)
        assert read_response(idle).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert idle.recv(4096) == b""  # GENSERVE_KEEP_ALIVE_TIMEOUT_S=1
        assert time.monotonic() - start < 3
    with connect(edge) as slow:  # a second head dribbled in after a first request
        slow.sendall(request)
        assert read_response(slow).startswith(b"HTTP/1.1 200")
        slow.settimeout(0.4)
        start, answer = time.monotonic(), b""
        for line in [b"GET /livez HTTP/1.1\r\n"] + [b"X-Slow: 1\r\n"] * 20:
            try:
                slow.sendall(line)
                answer += slow.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 2


def test_connections_per_client_address_are_capped(edge):
    held = [connect(edge) for _ in range(CONNECTIONS_PER_ADDRESS)]
    try:
        time.sleep(0.2)
        with connect(edge) as extra:
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
        assert b'"too_many_connections"' in answer and b"retry-after: 1" in answer.lower()
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{edge.url}/livez").status_code == 200  # room again


def test_a_head_over_the_limit_is_431_not_a_reset(edge):
    with connect(edge) as s:
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b'"headers_too_large"' in answer


def test_paths_cannot_forge_log_lines(edge):
    forged = b"2026-12-07T06:40:00+0000 [INFO] [cli] admin login ok"
    with connect(edge) as s:
        s.sendall(b"GET /livez%0a" + forged.replace(b" ", b"%20") + b"%1b[2K%00 HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 404")
    time.sleep(0.5)
    log = edge.log_path.read_bytes()
    assert b"/livez\\x0a" + forged in log  # escaped, on the request's own line
    assert b"\n" + forged not in log and b"\x1b" not in log and b"\x00" not in log


def wrong_keys(server, source: str, count: int, forwarded_for=None) -> list[int]:
    """`count` requests with wrong keys from the loopback address `source` (each test its own)."""
    codes = []
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
        for i in range(count):
            headers = {"Authorization": f"Bearer guess-{i}"}
            if forwarded_for:
                headers["X-Forwarded-For"] = forwarded_for(i)
            codes.append(client.get(f"{server.url}/v1/models", headers=headers).status_code)
    return codes


def test_failed_authentication_is_limited_per_address(edge):
    codes = wrong_keys(edge, "127.0.0.2", 30)
    assert codes == [401] * 5 + [429] * 25, codes  # GENSERVE_AUTH_FAILURE_LIMIT=5/min
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as client:
        r = client.get(f"{edge.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # a right guess waits too
    assert httpx.get(f"{edge.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_forwarded_for_from_loopback_does_not_choose_the_address(edge):
    """uvicorn believed X-Forwarded-For from 127.0.0.1: each made-up value was a new client."""
    codes = wrong_keys(edge, "127.0.0.3", 30, forwarded_for=lambda i: f"203.0.113.{i}" if i % 2 else f"not-an-ip-{i}")
    assert codes == [401] * 5 + [429] * 25, codes
