"""Closed-loop HTTP load for the benchmarks: `concurrency` clients, each sending its next
request as soon as the last one is answered, for `seconds`."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx


async def measure(url: str, path: str, make_body, concurrency: int, seconds: float, timeout: float = 120) -> dict:
    """One timed window after a warm-up request: the raw latencies, errors and wall time.
    Client w's request i has body make_body(w * 100_000 + i)."""
    latencies, errors = [], 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await http.post(url + path, json=make_body(worker * 100_000 + i))
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200
            i += 1

    async with httpx.AsyncClient(timeout=timeout) as http:
        await http.post(url + path, json=make_body(0))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "wall": wall}


def summarise(windows: list[dict]) -> dict:
    """Windows of `measure` -> requests/s, p50/p95 ms, requests and errors over all of them."""
    latencies = sorted(x for w in windows for x in w["latencies"])
    wall = sum(w["wall"] for w in windows)
    return {"rps": len(latencies) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))], "requests": len(latencies),
            "errors": sum(w["errors"] for w in windows)}
