"""Soak: many mixed requests against a service it starts on loopback, with the worker's RSS
recorded over time. Passes when RSS never exceeds the ceiling (GENSERVE_MEMORY_LIMIT_MB,
set here) and returns within --max-growth-mb of its warm level after the load.

    .venv/bin/python loadtests/soak.py --requests 10000                # the full run
    .venv/bin/python loadtests/soak.py --requests 2000 --upscales 4    # a shorter one

The mix (seeded): small GAN requests, 4-step txt2img, requests refused with 422, bodies of
the maximum size (GENSERVE_MAX_BODY_BYTES less 1 KiB of JSON whitespace, to the GAN
endpoint: parsed, answered 200), and --upscales upscales of a --upscale-side PNG, spread
through the run. Bounded by --requests and --max-seconds, whichever comes first; the
service is started here (embedded backend) on a free loopback port and stopped after.

Writes `soak.png` (RSS over time) and `soak.json` (the numbers) under --out, and prints a
summary; exit 1 when a bound is broken, 2 on a failed run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.local_server import LocalServer  # noqa: E402

WORKER_MODULE = "_bentoml_impl.worker.service"
SAMPLE_S = 0.25
WARMUP_REQUESTS = 200
MAX_BODY_BYTES = 20 * 1024 * 1024  # the service's default GENSERVE_MAX_BODY_BYTES


def png_b64(side: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def requests_of(kind: str, upscale_image: str) -> dict:
    json_ct = {"content-type": "application/json"}
    if kind == "gan":
        return dict(method="POST", url="/v1/gan/generate", json={"seed": random.randrange(2**31), "num_images": 2})
    if kind == "txt2img":
        return dict(method="POST", url="/v1/txt2img",
                    json={"prompt": "a handwritten digit seven", "num_inference_steps": 4, "seed": 1})
    if kind == "invalid":
        return dict(method="POST", url="/v1/txt2img", json={"prompt": "x", "num_inference_steps": 10**9})
    if kind == "max_body":
        body = b'{"seed": 1' + b" " * (MAX_BODY_BYTES - 1024) + b"}"
        return dict(method="POST", url="/v1/gan/generate", content=body, headers=json_ct)
    if kind == "upscale":
        return dict(method="POST", url="/v1/upscale", json={"image": upscale_image, "model": "esrgan_x4_photos"})
    raise ValueError(kind)


MIX = {"gan": 0.55, "txt2img": 0.15, "invalid": 0.2, "max_body": 0.1}


def plan(total: int, upscales: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=total - upscales)
    for i in range(upscales):  # spread through the run
        kinds.insert((i + 1) * len(kinds) // (upscales + 1), "upscale")
    return kinds


class Sampler(threading.Thread):
    def __init__(self, process):
        super().__init__(daemon=True)
        self.process, self.samples, self.stop = process, [], threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - self.t0, self.process.memory_info().rss))
            self.stop.wait(SAMPLE_S)

    def now_mb(self) -> float:
        return self.process.memory_info().rss / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--upscales", type=int, default=5, help="upscales among them")
    ap.add_argument("--upscale-side", type=int, default=512, help="input side (x4 output)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    ap.add_argument("--memory-limit-mb", type=int, default=3000, help="GENSERVE_MEMORY_LIMIT_MB: the ceiling")
    ap.add_argument("--max-growth-mb", type=float, default=100.0)
    ap.add_argument("--settle-seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if not 0 < args.requests <= 100_000 or not 0 < args.max_seconds <= 7200:
        print("--requests must be in 1..100000 and --max-seconds in (0, 7200]", file=sys.stderr)
        return 2
    import httpx
    import psutil

    args.out.mkdir(parents=True, exist_ok=True)
    repository = os.environ.get("GENSERVE_MODEL_REPOSITORY", str(ROOT / "model_repository"))
    server = LocalServer({"GENSERVE_MODEL_REPOSITORY": repository, "GENSERVE_BACKEND": "onnxruntime",
                          "GENSERVE_MEMORY_LIMIT_MB": str(args.memory_limit_mb)},
                         Path(tempfile.gettempdir()) / "genserve_soak_server.log")
    try:
        server.wait_ready()
        worker = next(p for p in psutil.Process(server.proc.pid).children(recursive=True)
                      if any(WORKER_MODULE in part for part in p.cmdline()))
        sampler = Sampler(worker)
        sampler.start()
        upscale_image = png_b64(args.upscale_side)
        kinds = plan(args.requests, args.upscales, args.seed)
        local = threading.local()
        counts: dict[str, dict[int, int]] = {}
        lock = threading.Lock()
        deadline = time.monotonic() + args.max_seconds

        def one(kind: str) -> None:
            if time.monotonic() > deadline:
                return
            if not hasattr(local, "client"):  # kept-alive connections, as SDKs keep them
                local.client = httpx.Client(base_url=server.url, timeout=600)
            try:
                status = local.client.request(**requests_of(kind, upscale_image)).status_code
            except httpx.HTTPError:
                status = 0
            with lock:
                by_status = counts.setdefault(kind, {})
                by_status[status] = by_status.get(status, 0) + 1

        # Warm-up: every kind once (an upscale included), then a burst of the mix at the load's
        # concurrency, so the model sessions' buffers have their batched sizes (the embedded
        # backend merges concurrent calls up to max_batch_size); then the warm level.
        for kind in [*MIX, "upscale"]:
            one(kind)
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, plan(WARMUP_REQUESTS, 0, args.seed + 1)))
        time.sleep(3)
        warm_mb, load_start = sampler.now_mb(), sampler.samples[-1][0]
        counts.clear()
        started = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, kinds))
        load_s = time.monotonic() - started
        load_end = sampler.samples[-1][0]
        settle_until = time.monotonic() + args.settle_seconds
        while time.monotonic() < settle_until and sampler.now_mb() - warm_mb > args.max_growth_mb:
            time.sleep(1)
        time.sleep(2)
        after_mb = sampler.now_mb()
        sampler.stop.set()
        sampler.join()
    except Exception as exc:
        print(f"soak failed: {type(exc).__name__}: {exc}\n{server.logs()}", file=sys.stderr)
        return 2
    finally:
        server.stop()

    sent = sum(sum(c.values()) for c in counts.values())
    peak_mb = max(rss for t, rss in sampler.samples if load_start <= t <= load_end) / 2**20
    result = {
        "command": "python loadtests/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "requests_sent": sent, "load_seconds": round(load_s, 1), "concurrency": args.concurrency,
        "by_kind_and_status": {k: {str(s): n for s, n in sorted(c.items())} for k, c in sorted(counts.items())},
        "upscale_output": f"{args.upscale_side * 4}x{args.upscale_side * 4}",
        "warm_rss_mb": round(warm_mb, 1), "peak_rss_mb": round(peak_mb, 1), "after_rss_mb": round(after_mb, 1),
        "ceiling_mb": args.memory_limit_mb, "max_growth_mb": args.max_growth_mb,
    }
    failures = []
    if peak_mb > args.memory_limit_mb:
        failures.append(f"RSS peaked at {peak_mb:.0f} MB, over the {args.memory_limit_mb} MB ceiling")
    if after_mb - warm_mb > args.max_growth_mb:
        failures.append(f"RSS settled at {after_mb:.0f} MB, {after_mb - warm_mb:.0f} MB over warm ({warm_mb:.0f} MB)")
    errors = {k: n for k, c in counts.items() for s, n in c.items() if s == 0 or (s >= 500 and s != 503)}
    if errors:
        failures.append(f"transport errors or 5xx: {errors}")
    result["failures"] = failures
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(sampler.samples, load_start, load_end, warm_mb, args, args.out / "soak.png")
    print(json.dumps(result, indent=2))
    return 1 if failures else 0


def plot(samples, load_start: float, load_end: float, warm_mb: float, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    mb = [s[1] / 2**20 for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, mb, lw=1, label="worker RSS")
    ax.axhline(args.memory_limit_mb, color="red", ls="--", lw=1, label=f"ceiling ({args.memory_limit_mb} MB)")
    ax.axhline(warm_mb + args.max_growth_mb, color="orange", ls=":", lw=1, label=f"warm + {args.max_growth_mb:g} MB")
    ax.axvspan(load_start, load_end, color="grey", alpha=0.15, label="load")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MB")
    ax.set_title(f"soak: {args.requests} mixed requests, {args.upscales} upscales to "
                 f"{args.upscale_side * 4}x{args.upscale_side * 4}, {args.concurrency} clients")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
