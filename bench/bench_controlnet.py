"""ControlNet on the step engine: what the U-Net's residual inputs cost when no request uses
them, and a mixed control/no-control load against the same requests split by control.

    .venv/bin/python bench/bench_controlnet.py --rounds 5 --requests 16

Exports the demo SD folder (zoo/checkpoints/sd_digits) twice into a temporary repository, with
and without ControlNet inputs (`export sd --no-controlnet-inputs`), plus a ControlNet with random
weights for it (its cost does not depend on them).
1. Unused inputs: one denoiser call through the pipeline (`DiffusionPipeline.denoise`, so the
   zero residuals' allocation counts) at the native size, per batch of rows, both graphs
   alternating; median of `--rounds` x 20 calls.
2. Mixed vs split: `--requests` txt2img requests (steps 10-20, guidance 1-7.5), every other one
   with the ControlNet, through one DiffusionEngine: all submitted at once (mixed batches) and
   the same requests as two waves (control ones, then the others); images/s, modes alternating
   per round.
Appends the tables with the command to bench/results/controlnet.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import export  # noqa: E402,F401 - first: diffusers finds torchvision importable
from bench.report import append_report  # noqa: E402

FOLDER = ROOT / "zoo" / "checkpoints" / "sd_digits"


def build(root: Path):
    from export.controlnet import export_controlnet
    from export.stable_diffusion import export_stable_diffusion
    from services.pipelines.pipeline_stable_diffusion import pipelines
    from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from services.runtime.repository import ModelRepository
    from tests.fixtures.controlnet_folder import build_random_controlnet_folder

    repo = root / "repository"
    quiet = dict(progress=lambda _: None, deepcache=False)
    export_stable_diffusion(FOLDER, repo, "with_inputs", **quiet)
    export_stable_diffusion(FOLDER, repo, "without_inputs", controlnet_inputs=False, **quiet)
    export_controlnet(build_random_controlnet_folder(FOLDER, root / "control"), repo, "with_inputs",
                      progress=lambda _: None)
    return pipelines(OnnxRuntimeBackend(ModelRepository(repo)))


async def unused_inputs(found, rounds: int) -> list[str]:
    from services.pipelines.diffusion import DiffusionRequest

    lines = ["| rows | without inputs (ms) | with zero inputs (ms) | ratio |", "|---|---|---|---|"]
    for rows in (1, 2, 8, 16):
        feeds = {}
        for name in ("with_inputs", "without_inputs"):
            p = found[name]
            req = DiffusionRequest(prompt="7", num_images=rows, guidance_scale=1.0, num_inference_steps=1)
            keys = p.tokenize(req)
            feeds[name] = (p, (await p.start(req, await p.encode_prompts(keys))).model_inputs())
            await p.denoise(feeds[name][1])
        times = {name: [] for name in feeds}
        for _ in range(rounds * 20):
            for name, (p, inputs) in feeds.items():
                t0 = time.perf_counter()
                await p.denoise(inputs)
                times[name].append(time.perf_counter() - t0)
        a, b = (1000 * float(np.median(times[n])) for n in ("without_inputs", "with_inputs"))
        lines.append(f"| {rows} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    return lines


async def mixed_vs_split(pipeline, requests: int, rounds: int) -> list[str]:
    from services.engine.engine import DiffusionEngine, EngineConfig
    from services.pipelines.controlnet import ControlUnit
    from services.pipelines.diffusion import DiffusionRequest

    rng = np.random.default_rng(0)
    side = pipeline.spec.native_height
    image = (rng.random((3, side, side)) > 0.8).astype(np.float32)
    reqs = [DiffusionRequest(prompt=str(i % 10), num_inference_steps=int(rng.integers(10, 21)),
                             guidance_scale=float(rng.choice([1.0, 3.0, 5.0, 7.5])), seed=i,
                             controlnet=[ControlUnit("control", image, 1.0)] if i % 2 == 0 else [])
            for i in range(requests)]
    engine = DiffusionEngine(pipeline, EngineConfig(16, 100_000))
    await engine.warmup()

    async def run(waves):
        t0 = time.perf_counter()
        for wave in waves:
            await asyncio.gather(*(engine.generate(r, 600) for r in wave))
        return time.perf_counter() - t0

    results = {"mixed": [], "split": []}
    for _ in range(rounds):
        results["mixed"].append(await run([reqs]))
        results["split"].append(await run([[r for r in reqs if r.controlnet], [r for r in reqs if not r.controlnet]]))
    await engine.close()
    lines = ["| mode | images/s (median) | seconds per round |", "|---|---|---|"]
    for mode, seconds in results.items():
        s = float(np.median(seconds))
        lines.append(f"| {mode} | {requests / s:.2f} | {s:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = build(Path(tmp))
        unused = asyncio.run(unused_inputs(found, args.rounds))
        mixed = asyncio.run(mixed_vs_split(found["with_inputs"], args.requests, args.rounds))
    command = "`.venv/bin/python bench/bench_controlnet.py " + shlex.join(sys.argv[1:]) + "`"
    append_report(ROOT / "bench" / "results" / "controlnet.md", [
        f"## {time.strftime('%Y-%m-%d %H:%M')} (2 cores, no GPU, sd_digits, ONNX Runtime)", "", command, "",
        "ControlNet residual inputs left unused (zeros), one denoiser call at the native size:", "", *unused, "",
        f"{args.requests} requests, every other one with a ControlNet: mixed batches vs split by control:", "",
        *mixed])


if __name__ == "__main__":
    main()
