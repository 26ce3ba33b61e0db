"""Slowloris from one address: connections that send one header line every few seconds,
and connections that send nothing; prints how many are still open over time and what
the server answered.

    .venv/bin/python loadtests/slowloris.py                          # a local server, default settings
    .venv/bin/python loadtests/slowloris.py --url http://host:3000   # a running one

Each connection is a file descriptor here: raise `ulimit -n` above --slow + --silent.
"""

from __future__ import annotations

import argparse
import collections
import select
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]


def hold(slow: list[socket.socket], silent: list[socket.socket], every_s: float, seconds: float,
         on_tick: Callable[[float, int], None] | None = None) -> tuple[dict[socket.socket, bytes], int, float]:
    """Starts a request on each `slow` connection and sends it one more header line every
    `every_s`; reads what the server answers on all of them until each is closed or `seconds`
    pass. `on_tick(elapsed_s, open)` after each read. Returns (answer per connection, how many
    are still open, seconds held)."""
    for c in slow:
        c.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
    answers = {c: b"" for c in slow + silent}
    open_ = set(answers)
    start = last_line = time.monotonic()
    while open_ and time.monotonic() - start < seconds:
        if time.monotonic() - last_line >= every_s:
            last_line = time.monotonic()
            for c in [c for c in slow if c in open_]:
                try:
                    c.sendall(b"X-Slow: 1\r\n")
                except OSError:  # reset or closed: the server is done with it
                    open_.discard(c)
        for c in select.select(list(open_), [], [], 0.5)[0]:
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            answers[c] += data
            if not data:
                open_.discard(c)
        if on_tick is not None:
            on_tick(time.monotonic() - start, len(open_))
    return answers, len(open_), time.monotonic() - start


def probe(host: str, port: int, slow: int, silent: int, every_s: float, seconds: float) -> None:
    conns = [socket.create_connection((host, port), timeout=10) for _ in range(slow + silent)]
    marks = [1, 5, 12, 20, 40, 60, 97]

    def report(elapsed_s: float, still_open: int) -> None:
        while marks and elapsed_s >= marks[0]:
            print(f"t={marks.pop(0)}s: {still_open} of {len(conns)} connections open", flush=True)

    answers, still_open, held = hold(conns[:slow], conns[slow:], every_s, seconds, report)
    print(f"t={held:.0f}s: {still_open} of {len(conns)} connections open")
    seen = collections.Counter(a.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without an answer"
                               for a in answers.values())
    print("answers:", dict(seen))
    for c in conns:
        c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one on model_repository/)")
    p.add_argument("--slow", type=int, default=300, help="connections sending a header line every --every s")
    p.add_argument("--silent", type=int, default=50, help="connections sending nothing")
    p.add_argument("--every", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=40.0)
    args = p.parse_args()
    if args.url:
        url = urlsplit(args.url)
        probe(url.hostname, url.port or 80, args.slow, args.silent, args.every, args.seconds)
        return 0
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.local_server import LocalServer

    server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(ROOT / "model_repository")},
                         Path(tempfile.mkdtemp(prefix="slowloris-")) / "bentoml.log")
    try:
        server.wait_ready()
        probe("127.0.0.1", server.port, args.slow, args.silent, args.every, args.seconds)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
