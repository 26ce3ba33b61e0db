"""Megapixels per second through `POST /v1/upscale` (concurrency 1 and 4) against
spandrel's PyTorch model run directly on the same images, in one process run.

    .venv/bin/python bench/bench_upscale.py --seconds 20        # starts its own service

The model is the ESRGAN x4 demo (zoo/checkpoints/esrgan_x4_photos.safetensors), exported
into a temporary repository; the images are the held-out photos degraded x1/4 (the
inputs the demo is judged on: 128x128, 75x112 and 106x160). Throughput counts output
pixels. PyTorch is spandrel's descriptor (`model(image)`, whole image, one at a time,
torch's default threads); the service tiles at the model's default tile (128, overlap 16)
and batches tiles across concurrent requests. The table and command are appended to
bench/results/upscale.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.local_server import LocalServer  # noqa: E402


def inputs() -> list[np.ndarray]:
    from zoo.super_resolution.data import HELD_OUT, bicubic_down, crop_to_multiple, load_photo

    return [bicubic_down(crop_to_multiple(load_photo(n), 4), 4) for n in HELD_OUT]


def png(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bench_torch(checkpoint: Path, images: list[np.ndarray], seconds: float) -> dict:
    import torch

    from zoo.super_resolution.evaluate import load_model, upscale

    model = load_model(checkpoint)
    upscale(model, images[0])  # warm-up
    pixels, calls, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        image = images[calls % len(images)]
        upscale(model, image)
        pixels += image.shape[0] * image.shape[1] * 16
        calls += 1
    elapsed = time.perf_counter() - t0
    return {"requests": calls, "mp_s": pixels / elapsed / 1e6, "p50_ms": None, "threads": torch.get_num_threads()}


async def bench_http(url: str, bodies: list[str], sizes: list[int], concurrency: int, seconds: float) -> dict:
    latencies, pixels, errors = [], 0, 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal pixels, errors
        i = worker
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/upscale",
                                json={"model": "esrgan_x4_photos", "image": bodies[i % len(bodies)]})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
                pixels += sizes[i % len(bodies)]
            else:
                errors += 1
            i += concurrency

    async with httpx.AsyncClient(timeout=120) as http:
        await http.post(f"{url}/v1/upscale", json={"model": "esrgan_x4_photos", "image": bodies[0]})  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"requests": len(latencies), "errors": errors, "mp_s": pixels / elapsed / 1e6,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="per line (default 20)")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "zoo" / "checkpoints" / "esrgan_x4_photos.safetensors")
    args = p.parse_args(argv)
    from export.super_resolution import export_sr

    images = inputs()
    bodies, sizes = [png(i) for i in images], [i.shape[0] * i.shape[1] * 16 for i in images]
    rows = [("pytorch (spandrel, direct)", 1, bench_torch(args.checkpoint, images, args.seconds))]
    with tempfile.TemporaryDirectory() as tmp:
        export_sr(args.checkpoint, Path(tmp) / "repo", "esrgan_x4_photos")
        server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(Path(tmp) / "repo")}, Path(tmp) / "bentoml.log")
        try:
            server.wait_ready()
            for c in (1, 4):
                rows.append(("/v1/upscale (onnxruntime, tiled)", c,
                             asyncio.run(bench_http(server.url, bodies, sizes, c, args.seconds))))
        finally:
            server.stop()
    base = rows[0][2]["mp_s"]
    lines = ["| path | concurrency | requests | output MP/s | x pytorch | p50 ms |", "|---|---:|---:|---:|---:|---:|"]
    for name, c, r in rows:
        p50 = f"{r['p50_ms']:.0f}" if r.get("p50_ms") else ""
        lines.append(f"| {name} | {c} | {r['requests']} | {r['mp_s']:.3f} | {r['mp_s'] / base:.2f} | {p50} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench" / "results" / "upscale.md"
    with out.open("a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} "
                f"({platform.machine()}, {__import__('os').cpu_count()} cores)\n\n"
                f"`.venv/bin/python bench/bench_upscale.py --seconds {args.seconds:g}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
