"""Embedded ONNX Runtime vs Triton, through the same HTTP service, in one run.

    .venv/bin/python bench/bench_backends.py --seconds 10

Starts a real Triton (deploy/triton_cpu/launch.py) on model_repository/ and three services
on loopback — GENSERVE_BACKEND=onnxruntime, and GENSERVE_BACKEND=triton twice: tensors
through the gRPC socket (GENSERVE_TRITON_SHARED_MEMORY=off) and through shared memory
(=required, so a failed negotiation stops the run instead of measuring the socket twice)
— then measures, for each: GAN latency at concurrency 1, GAN throughput at concurrency 8,
txt2img at concurrency 1 and 4 (20 steps), in `--rounds` interleaved windows per scenario
so that the ratios compare backends under the same neighbours. Prints the table with Triton/embedded ratios,
and for the txt2img rows where Triton spends a U-Net call (its own statistics: queue
wait, compute, and what is left for the client, gRPC and transport), and appends both,
with the command, to bench/results/backends.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import measure, summarise  # noqa: E402
from bench.report import append_report  # noqa: E402
from tests.fixtures.local_server import LocalServer, free_port  # noqa: E402

LAUNCH = ROOT / "deploy" / "triton_cpu" / "launch.py"


SCENARIOS = [
    ("GAN, concurrency 1", "/v1/gan/generate", lambda s: {"seed": s, "class_label": s % 10}, 1),
    ("GAN, concurrency 8", "/v1/gan/generate", lambda s: {"seed": s, "class_label": s % 10}, 8),
    ("txt2img 20 steps, concurrency 1", "/v1/txt2img",
     lambda s: {"prompt": "a handwritten digit five", "seed": s, "num_inference_steps": 20}, 1),
    ("txt2img 20 steps, concurrency 4", "/v1/txt2img",
     lambda s: {"prompt": "a handwritten digit five", "seed": s, "num_inference_steps": 20}, 4),
]
BACKENDS = {  # name -> the service's environment beyond the repository
    "embedded": {"GENSERVE_BACKEND": "onnxruntime"},
    "triton socket": {"GENSERVE_BACKEND": "triton", "GENSERVE_TRITON_SHARED_MEMORY": "off"},
    "triton shm": {"GENSERVE_BACKEND": "triton", "GENSERVE_TRITON_SHARED_MEMORY": "required"},
}
UNET = "sd_digits_unet"


def unet_stats(grpc_url: str) -> dict[str, float]:
    """Triton's cumulative statistics for the U-Net: calls, and ns in queue / compute / total."""
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(UNET, as_json=True)["model_stats"][0]["inference_stats"]
    finally:
        client.close()
    return {"calls": int(stats["success"].get("count", 0)), "success": int(stats["success"].get("ns", 0)),
            **{k: int(stats[k].get("ns", 0)) for k in ("queue", "compute_input", "compute_infer", "compute_output")}}


def transport_line(url: str) -> str:
    """What the service's /metrics says about its transport to Triton."""
    text = httpx.get(url + "/metrics", timeout=10).text
    active = [line for line in text.splitlines() if line.startswith("genserve_triton_shared_memory_active")]
    calls = [line for line in text.splitlines() if line.startswith("genserve_triton_calls_total")
             and UNET in line]
    return "; ".join(active + calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario and backend")
    parser.add_argument("--rounds", type=int, default=3, help="windows per scenario and backend, interleaved")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backends.md")
    args = parser.parse_args()
    args.load = " ".join(f"{x:.2f}" for x in __import__("os").getloadavg())  # before we add to it

    work = Path(tempfile.mkdtemp(prefix="genserve-bench-"))
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    grpc_url = f"127.0.0.1:{grpc_port}"
    subprocess.run([sys.executable, str(LAUNCH), "--model-repository", str(args.repository),
                    "--address", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                    "--metrics-port", str(metrics_port), "--workdir", str(work), "--wait-ready", "180"],
                   check=True, stdout=subprocess.DEVNULL)
    servers, rows, unet, transports = {}, [], {}, {}
    try:
        env = {"GENSERVE_MODEL_REPOSITORY": str(args.repository), "GENSERVE_TRITON_URL": grpc_url}
        for backend, extra in BACKENDS.items():
            servers[backend] = LocalServer({**env, **extra}, work / f"{backend.replace(' ', '_')}.log")
        for server in servers.values():
            server.wait_ready()
        for name, path, body, concurrency in SCENARIOS:
            # Rounds, the backends' order rotating: a neighbour's job that starts or stops
            # mid-scenario lands on every backend, not on whichever ran then.
            windows = {b: [] for b in servers}
            order = list(servers)
            for r in range(args.rounds):
                for backend in order[r % len(order):] + order[:r % len(order)]:
                    before = unet_stats(grpc_url)
                    windows[backend].append(asyncio.run(measure(servers[backend].url, path, body, concurrency,
                                                                args.seconds / args.rounds)))
                    after = unet_stats(grpc_url)
                    if "txt2img" in name and backend != "embedded":
                        total = unet.setdefault((name, backend), dict.fromkeys(after, 0))
                        for k in after:
                            total[k] += after[k] - before[k]
            rows.append((name, {b: summarise(w) for b, w in windows.items()}))
        transports = {b: transport_line(s.url) for b, s in servers.items() if b != "embedded"}
    finally:
        for server in servers.values():
            server.stop()
        subprocess.run([sys.executable, str(LAUNCH), "stop", "--workdir", str(work)], stdout=subprocess.DEVNULL)

    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, "
             f"{__import__('os').cpu_count()} cores, load average {args.load})", "",
             f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
             "| scenario | backend | requests | errors | req/s | p50 ms | p95 ms | Triton / embedded req/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, result in rows:
        for backend, r in result.items():
            ratio = "" if backend == "embedded" else f"{r['rps'] / result['embedded']['rps']:.2f}"
            lines.append(f"| {name} | {backend} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
                         f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {ratio} |")
    lines += ["", "Where a U-Net call's time goes (Triton's statistics over the same runs; ms per call):", "",
              "| scenario | backend | U-Net calls | queue | compute in | compute | compute out | Triton total |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (name, backend), d in unet.items():
        n = max(1, d["calls"])
        lines.append(f"| {name} | {backend} | {d['calls']} | " + " | ".join(
            f"{d[k] / n / 1e6:.2f}" for k in ("queue", "compute_input", "compute_infer", "compute_output", "success"))
            + " |")
    lines += ["", *(f"- {b}: `{t}`" for b, t in transports.items())]
    append_report(args.out, lines)
    return 1 if any(r["errors"] for _, res in rows for r in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
