"""Embedded ONNX Runtime vs Triton, through the same HTTP service, in one run.

    .venv/bin/python bench/bench_backends.py --seconds 10

Starts a real Triton (deploy/triton_cpu/launch.py) on model_repository/ and two services
on loopback — GENSERVE_BACKEND=onnxruntime and GENSERVE_BACKEND=triton — then measures,
for each: GAN latency at concurrency 1, GAN throughput at concurrency 8, and txt2img
latency at concurrency 1 (20 steps). Prints the table with Triton/embedded ratios and
appends it, with the command, to bench/results/backends.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.local_server import LocalServer, free_port  # noqa: E402

LAUNCH = ROOT / "deploy" / "triton_cpu" / "launch.py"


async def measure(url: str, path: str, make_body, concurrency: int, seconds: float) -> dict:
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

    async with httpx.AsyncClient(timeout=120) as http:
        await http.post(url + path, json=make_body(0))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))], "requests": len(latencies),
            "errors": errors}


SCENARIOS = [
    ("GAN, concurrency 1", "/v1/gan/generate", lambda s: {"seed": s, "class_label": s % 10}, 1),
    ("GAN, concurrency 8", "/v1/gan/generate", lambda s: {"seed": s, "class_label": s % 10}, 8),
    ("txt2img 20 steps, concurrency 1", "/v1/txt2img",
     lambda s: {"prompt": "a handwritten digit five", "seed": s, "num_inference_steps": 20}, 1),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario and backend")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backends.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="genserve-bench-"))
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    subprocess.run([sys.executable, str(LAUNCH), "--model-repository", str(args.repository),
                    "--address", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                    "--metrics-port", str(metrics_port), "--workdir", str(work), "--wait-ready", "180"],
                   check=True, stdout=subprocess.DEVNULL)
    servers = {}
    try:
        env = {"GENSERVE_MODEL_REPOSITORY": str(args.repository)}
        servers["embedded"] = LocalServer({**env, "GENSERVE_BACKEND": "onnxruntime"}, work / "embedded.log")
        servers["triton"] = LocalServer({**env, "GENSERVE_BACKEND": "triton",
                                         "GENSERVE_TRITON_URL": f"127.0.0.1:{grpc_port}"}, work / "triton.log")
        for server in servers.values():
            server.wait_ready()
        rows = []
        for name, path, body, concurrency in SCENARIOS:
            result = {b: asyncio.run(measure(s.url, path, body, concurrency, args.seconds)) for b, s in servers.items()}
            rows.append((name, result))
    finally:
        for server in servers.values():
            server.stop()
        subprocess.run([sys.executable, str(LAUNCH), "stop", "--workdir", str(work)], stdout=subprocess.DEVNULL)

    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, "
             f"{__import__('os').cpu_count()} cores)", "", f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
             "| scenario | backend | requests | errors | req/s | p50 ms | p95 ms | Triton / embedded req/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, result in rows:
        ratio = result["triton"]["rps"] / result["embedded"]["rps"]
        for backend, r in result.items():
            lines.append(f"| {name} | {backend} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
                         f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {f'{ratio:.2f}' if backend == 'triton' else ''} |")
    table = "\n".join(lines) + "\n\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(table)
    return 1 if any(r["errors"] for _, res in rows for r in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
