"""What a short request pays beside a long one: where the goodput bench's misses come from.

    .venv/bin/python bench/bench_short_beside_long.py [--overlap auto|1|0]

One service (the demo repository). First 300 four-step unguided 32 px requests one after
another, alone (a 50 ms pause between them): the service's own jitter. Then 150 of them while a
second client sends 50-step guided (7.5) 32 px requests back to back, so one long request is
always running beside them: the cost of sharing its U-Net calls. Prints and appends to
bench/results/short_beside_long.md the client latency (median, p90, p99, max), how many pass 3x
the median alone (the goodput bench's target), and the service's median stage timings beside
the long one.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_request_breakdown import load_average  # noqa: E402
from bench.report import append_report  # noqa: E402
from tests.fixtures.local_server import LocalServer  # noqa: E402

SHORT = {"prompt": "a handwritten digit three", "num_inference_steps": 4, "guidance_scale": 1.0,
         "scheduler": "ddim", "height": 32, "width": 32}
LONG = {"prompt": "a handwritten digit five", "num_inference_steps": 50, "guidance_scale": 7.5,
        "scheduler": "ddim", "height": 32, "width": 32}


def shorts(client: httpx.Client, url: str, n: int) -> tuple[np.ndarray, list[dict]]:
    latencies, timings = [], []
    for i in range(n):
        t0 = time.perf_counter()
        r = client.post(url + "/v1/txt2img", json={**SHORT, "seed": i})
        latencies.append(1000 * (time.perf_counter() - t0))
        r.raise_for_status()
        timings.append(r.json().get("timings", {}))
        time.sleep(0.05)
    return np.array(latencies), timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--overlap", default="auto", choices=("auto", "1", "0"), help="GENSERVE_ENGINE_OVERLAP")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "short_beside_long.md")
    args = parser.parse_args()
    server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(args.repository),
                          "GENSERVE_ENGINE_OVERLAP": args.overlap}, Path("/tmp/genserve-short-beside-long.log"))
    stop = threading.Event()

    def longs():
        with httpx.Client(timeout=120) as client:
            i = 0
            while not stop.is_set():
                client.post(server.url + "/v1/txt2img", json={**LONG, "seed": i}).raise_for_status()
                i += 1

    try:
        server.wait_ready()
        with httpx.Client(timeout=60) as client:
            shorts(client, server.url, 20)  # warm-up
            alone, _ = shorts(client, server.url, 300)
            beside_long = threading.Thread(target=longs)
            beside_long.start()
            time.sleep(1)
            beside, timings = shorts(client, server.url, 150)
            stop.set()
            beside_long.join()
    finally:
        stop.set()
        server.stop()
    target = 3 * float(np.median(alone))

    def row(name, x):
        return (f"| {name} | {len(x)} | {np.median(x):.1f} | {np.percentile(x, 90):.1f} | "
                f"{np.percentile(x, 99):.1f} | {x.max():.1f} | {int((x > target).sum())} |")

    names = sorted({k for t in timings for k in t})
    stages = {k: 1000 * float(np.median([t.get(k, 0.0) for t in timings])) for k in names}
    append_report(args.out, [
        f"## {time.strftime('%Y-%m-%d %H:%M')}, load average {load_average()}", "",
        f"`python bench/bench_short_beside_long.py --overlap {args.overlap}`", "",
        f"Four-step unguided 32 px requests, client latency in ms; target = 3 x the median alone = "
        f"{target:.1f} ms.", "",
        "| | requests | median | p90 | p99 | max | past the target |", "|---|---:|---:|---:|---:|---:|---:|",
        row("alone, one after another", alone), row("beside one 50-step guided request", beside), "",
        "Beside the long one, the service's median stage timings (ms): "
        + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in stages.items()) + "."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
