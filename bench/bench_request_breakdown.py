"""Where one txt2img request's time goes: end-to-end latency beside the model executions.

    .venv/bin/python bench/bench_request_breakdown.py --steps 20 --repeats 5

Starts the service on model_repository/ (embedded backend), sends one warm-up, then
`repeats` sequential 32x32 txt2img requests; for each, reads the client-side latency,
the response's stage timings, and the increase of genserve_model_execution_seconds_sum
(every model call the request made) from /metrics. Appends the table, with the command,
to bench/results/request_breakdown.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import append_report  # noqa: E402

from services.local_server import LocalServer  # noqa: E402


def execution_seconds(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("genserve_model_execution_seconds_sum{"):
            model = line.split('model="', 1)[1].split('"', 1)[0]
            out[model] = float(line.rsplit(" ", 1)[1])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "request_breakdown.md")
    args = parser.parse_args()

    server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(ROOT / "model_repository")},
                         Path("/tmp/genserve-bench-breakdown.log"))
    rows = []
    try:
        server.wait_ready()
        body = {"prompt": "a handwritten digit five", "num_inference_steps": args.steps, "guidance_scale": 5.0}
        httpx.post(f"{server.url}/v1/txt2img", json={**body, "seed": 0}, timeout=120)  # warm-up
        for seed in range(1, args.repeats + 1):
            before = execution_seconds(server.url)
            t0 = time.perf_counter()
            r = httpx.post(f"{server.url}/v1/txt2img", json={**body, "seed": seed}, timeout=120)
            latency = time.perf_counter() - t0
            r.raise_for_status()
            after = execution_seconds(server.url)
            models = sum(after[m] - before.get(m, 0.0) for m in after if m.startswith("sd_digits"))
            rows.append((latency, r.json()["timings"], models))
    finally:
        server.stop()

    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')}", "", f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
             f"32x32 txt2img, {args.steps} steps, guidance 5 (one text-encoder call, {args.steps} U-Net calls "
             "of 2 rows, one VAE decode), embedded backend, requests one after another", "",
             "| request | client latency ms | server total ms | sum of model executions ms | models / client |",
             "|---:|---:|---:|---:|---:|"]
    for i, (latency, timings, models) in enumerate(rows, 1):
        lines.append(f"| {i} | {1000 * latency:.1f} | {1000 * timings['total_seconds']:.1f} | "
                     f"{1000 * models:.1f} | {models / latency:.2f} |")
    append_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
