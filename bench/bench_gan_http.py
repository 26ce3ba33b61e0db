"""GAN endpoint throughput over real HTTP against a running service.

    .venv/bin/python bench/bench_gan_http.py --seconds 10          # starts its own service
    .venv/bin/python bench/bench_gan_http.py --url http://127.0.0.1:3000   # or a running one

Measures requests/s and images/s side by side in one run for several (concurrency,
num_images) settings, so their ratios are comparable on a noisy machine, and appends
the table with the command to bench/results/gan_http.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import measure, summarise  # noqa: E402
from bench.report import append_report  # noqa: E402
from tests.fixtures.local_server import LocalServer  # noqa: E402

SETTINGS = [(1, 1), (4, 1), (1, 16), (4, 16)]  # (concurrency, num_images)


def run_setting(url: str, concurrency: int, num_images: int, seconds: float) -> dict:
    def body(i: int) -> dict:
        return {"seed": i, "num_images": num_images, "class_label": i % 10}

    r = summarise([asyncio.run(measure(url, "/v1/gan/generate", body, concurrency, seconds, timeout=60))])
    return {"concurrency": concurrency, "num_images": num_images, **r, "images_per_s": r["rps"] * num_images}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service (default: start one on model_repository/)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per setting")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gan_http.md")
    args = parser.parse_args()

    server = None
    if args.url is None:
        server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(ROOT / "model_repository")},
                             Path("/tmp/genserve-bench-gan.log"))
        server.wait_ready()
    try:
        rows = [run_setting(args.url or server.url, c, n, args.seconds) for c, n in SETTINGS]
    finally:
        if server is not None:
            server.stop()
    base = rows[0]["images_per_s"]
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.processor() or platform.machine()})",
        "", f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
        "| concurrency | num_images | requests | errors | req/s | images/s | x images/s vs (1,1) | p50 ms | p95 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['num_images']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
                     f"{r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f} | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} |")
    append_report(args.out, lines)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
