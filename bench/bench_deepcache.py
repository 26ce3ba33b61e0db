"""DeepCache's trade-off per cache_interval, in one run: speed against the uncached image's quality.

    .venv/bin/python bench/bench_deepcache.py --intervals 1 2 3 5 --steps 20 --rounds 3

For each interval, on the embedded ONNX Runtime backend, in this process:
  speed     the step engine serving `--clients` concurrent clients (each one request after
            another: every digit's prompt, guidance 7.5, DDIM) and one client alone
            (concurrency 1); images/s, and the ratio to interval 1 in the same round.
            Rounds interleave the intervals, so drift on a shared machine hits them alike.
  quality   every image against the same request at interval 1 (PSNR of the 8-bit images
            the service would send), and the digit judge's accuracy on what it drew (the
            prompt names the digit; zoo/classifier.py's classifier reads it).
Appends the table with the command to bench/results/deepcache.md; say with `--note` whether
the machine was quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import export  # noqa: E402,F401 - first: transformers/diffusers (the judge's zoo) find torchvision importable
from bench.report import append_report  # noqa: E402
from services.engine.engine import DiffusionEngine, EngineConfig  # noqa: E402
from services.pipelines.pipeline_stable_diffusion import DiffusionRequest, pipelines  # noqa: E402
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from services.runtime.repository import ModelRepository  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((images / 2 + 0.5) * 255), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def requests(interval: int, steps: int, per_digit: int) -> list[DiffusionRequest]:
    return [DiffusionRequest(prompt=f"a handwritten digit {WORDS[d]}", num_inference_steps=steps, seed=100 * d + k,
                             scheduler="ddim", guidance_scale=7.5, cache_interval=interval)
            for d in range(10) for k in range(per_digit)]


async def serve(engine: DiffusionEngine, reqs: list[DiffusionRequest], clients: int) -> tuple[float, list]:
    """Wall seconds for `clients` concurrent clients working through `reqs`, and the outputs in order."""
    queue = list(enumerate(reqs))
    results: list = [None] * len(reqs)

    async def client():
        while queue:
            i, r = queue.pop(0)
            results[i] = await engine.generate(r, timeout_s=600)

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    return time.perf_counter() - t0, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="sd_digits")
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per-digit", type=int, default=3, help="requests per digit (10 digits)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--note", default="", help="the machine's state (quiet, or what shared it)")
    args = parser.parse_args()
    if 1 not in args.intervals:
        args.intervals.insert(0, 1)  # the reference every ratio and PSNR is taken against

    import torch

    from zoo.checkpoint import load_checkpoint

    judge = load_checkpoint("digit_classifier")
    pipeline = pipelines(OnnxRuntimeBackend(ModelRepository(args.repository)))[args.model]
    if pipeline.spec.shallow_denoiser is None:
        sys.exit(f"{args.model} has no shallow U-Net graph: re-export it (export/deepcache.py)")

    async def run():
        engine = DiffusionEngine(pipeline, EngineConfig(16, 100_000))
        await engine.warmup()
        speed = {n: {"concurrent": [], "alone": []} for n in args.intervals}
        images = {}
        for _ in range(args.rounds):
            for n in args.intervals:
                reqs = requests(n, args.steps, args.per_digit)
                wall, outs = await serve(engine, reqs, args.clients)
                speed[n]["concurrent"].append(len(reqs) / wall)
                images[n] = np.concatenate([o.images for o in outs])
                alone = reqs[:: max(1, len(reqs) // 10)][:10]
                wall, _ = await serve(engine, alone, 1)
                speed[n]["alone"].append(len(alone) / wall)
        await engine.close()
        return speed, images

    speed, images = asyncio.run(run())
    digits = np.repeat(np.arange(10), args.per_digit)
    with torch.no_grad():
        read = {n: judge(torch.from_numpy(x.astype(np.float32))).argmax(1).numpy() for n, x in images.items()}
    ref = to_uint8(images[1])
    load = Path("/proc/loadavg").read_text().split()[0]
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} — {args.model}, {args.steps} DDIM steps, guidance 7.5, "
             f"{len(digits)} requests per run, load average {load} at the end"
             + (f" ({args.note})" if args.note else ""),
             "", f"`{shlex.join(['.venv/bin/python', 'bench/bench_deepcache.py', *sys.argv[1:]])}`", "",
             f"| cache_interval | images/s, {args.clients} clients (median of {args.rounds}) | x interval 1 | "
             "images/s, 1 client | x interval 1 | PSNR vs interval 1 (dB, mean / min) | judge accuracy |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    base_c = [s for s in speed[1]["concurrent"]]
    base_a = [s for s in speed[1]["alone"]]
    for n in args.intervals:
        # Ratios per round (the same round's interval 1), then their median: drift cancels.
        rc = statistics.median(a / b for a, b in zip(speed[n]["concurrent"], base_c))
        ra = statistics.median(a / b for a, b in zip(speed[n]["alone"], base_a))
        per_image = [psnr(a, b) for a, b in zip(to_uint8(images[n]), ref)]
        finite = [p for p in per_image if np.isfinite(p)]
        quality = "identical" if not finite else f"{statistics.mean(finite):.1f} / {min(finite):.1f}"
        lines.append(f"| {n} | {statistics.median(speed[n]['concurrent']):.2f} | {rc:.2f} | "
                     f"{statistics.median(speed[n]['alone']):.2f} | {ra:.2f} | {quality} | "
                     f"{float(np.mean(read[n] == digits)):.0%} |")
    append_report(ROOT / "bench" / "results" / "deepcache.md", lines)


if __name__ == "__main__":
    main()
