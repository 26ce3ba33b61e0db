"""Step-level engine vs request-level batching vs one request at a time, in one run.

    .venv/bin/python bench/bench_engine.py --model sd_digits --clients 16 --requests-per-client 3

16 concurrent clients each send requests back to back (steps drawn from 10-30,
guidance from {1, 3, 5, 7.5}, prompts naming digits; the same workload for every mode,
seeded). Modes, all in this process on the embedded ONNX Runtime backend:
  sequential      one request at a time (a lock around the single-request pipeline)
  request-level   whole requests grouped as they arrive (up to the U-Net's batch), run in
                  lockstep until the group's longest request is done: a finished request
                  keeps its rows in the batch (a pipeline call's batch is fixed) and gets
                  its answer when the group ends; newcomers wait for the next group — how
                  request-batching servers treat multi-step pipelines
  step-level      the DiffusionEngine: requests join and leave between denoising steps
Prints images/s, p50/p95 latency and the ratios, and appends them with the command to
bench/results/engine.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.engine.engine import DiffusionEngine  # noqa: E402
from services.pipelines.pipeline_stable_diffusion import (  # noqa: E402
    DiffusionRequest,
    StableDiffusionPipeline,
    discover_stable_diffusion,
)
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from services.runtime.repository import ModelRepository  # noqa: E402

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def workload(clients: int, per_client: int, prompt: str, seed: int = 0) -> list[list[DiffusionRequest]]:
    rng = np.random.default_rng(seed)
    return [[DiffusionRequest(prompt=prompt.format(digit=DIGITS[rng.integers(10)]),
                              num_inference_steps=int(rng.integers(10, 31)),
                              guidance_scale=float(rng.choice([1.0, 3.0, 5.0, 7.5])),
                              seed=int(rng.integers(2**31)), scheduler="ddim")
             for _ in range(per_client)] for _ in range(clients)]


class Sequential:
    def __init__(self, pipeline):
        self.pipeline, self.lock = pipeline, asyncio.Lock()

    async def __call__(self, req):
        async with self.lock:
            return (await self.pipeline(req)).images


class RequestLevel:
    """Groups whole requests; a group runs until its longest member is done."""

    def __init__(self, pipeline, max_rows: int, wait_s: float = 0.005):
        self.pipeline, self.max_rows, self.wait_s = pipeline, max_rows, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    async def __call__(self, req):
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((req, future))
        return await future

    def rows(self, req):
        return req.num_images * (2 if req.guidance_scale > 1 else 1)

    async def _run(self):
        carry = None
        while True:
            group = [carry or await self.queue.get()]
            carry = None
            await asyncio.sleep(self.wait_s)
            while not self.queue.empty():
                item = self.queue.get_nowait()
                if sum(self.rows(r) for r, _ in group) + self.rows(item[0]) > self.max_rows:
                    carry = item
                    break
                group.append(item)
            reqs = [r for r, _ in group]
            embeddings = await self.pipeline.encode_prompts([x for r in reqs for x in self.pipeline.tokenize(r)])
            trajectories, offset = [], 0
            for r in reqs:
                k = len(self.pipeline.tokenize(r))
                trajectories.append(await self.pipeline.start(r, embeddings[offset:offset + k]))
                offset += k
            last_inputs = {}
            while not all(t.done for t in trajectories):
                # Finished members still occupy their rows: the batch is fixed for the call.
                inputs = []
                for t in trajectories:
                    if not t.done:
                        last_inputs[id(t)] = t.model_inputs()
                    inputs.append(last_inputs[id(t)])
                merged = {k: np.concatenate([x[k] for x in inputs]) for k in inputs[0]}
                out = (await self.pipeline.backend.infer(self.pipeline.models.unet, merged))["noise_pred"]
                o = 0
                for t in trajectories:
                    if not t.done:
                        t.advance(out[o:o + t.rows])
                    o += t.rows
            images = await self.pipeline.decode(np.concatenate([t.decoder_input() for t in trajectories]))
            o = 0
            for (r, future), t in zip(group, trajectories):
                future.set_result(images[o:o + r.num_images])
                o += r.num_images


class StepLevel:
    def __init__(self, pipeline, max_rows: int):
        self.engine = DiffusionEngine(pipeline, max_batch_rows=max_rows, max_queued_image_steps=10**9)

    async def __call__(self, req):
        return (await self.engine.generate(req, timeout_s=3600)).images


def unet_cost(pipeline, rows=(1, 4, 8, 16), repeats=30) -> dict[int, float]:
    """Milliseconds per U-Net call by batch rows: how much batching can save here."""
    m = pipeline.models
    spec = pipeline.backend.models()[m.unet]
    side = m.native_size // m.vae_scale_factor
    seq, hidden = spec.input("encoder_hidden_states").dims
    cost = {}
    for n in rows:
        feeds = {"sample": np.zeros((n, m.latent_channels, side, side), np.float32),
                 "timestep": np.ones((n, 1), np.float32), "encoder_hidden_states": np.zeros((n, seq, hidden), np.float32)}
        asyncio.run(pipeline.backend.infer(m.unet, feeds))
        start = time.perf_counter()
        for _ in range(repeats):
            asyncio.run(pipeline.backend.infer(m.unet, feeds))
        cost[n] = 1000 * (time.perf_counter() - start) / repeats
    return cost


async def run_mode(mode, jobs) -> dict:
    latencies, images = [], 0

    async def client(reqs):
        nonlocal images
        for r in reqs:
            t0 = time.perf_counter()
            out = await mode(r)
            latencies.append(time.perf_counter() - t0)
            images += len(out)

    start = time.perf_counter()
    await asyncio.gather(*(client(reqs) for reqs in jobs))
    wall = time.perf_counter() - start
    latencies.sort()
    return {"images_per_s": images / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))], "wall_s": wall, "requests": len(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="sd_digits")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--prompt", default="a handwritten digit {digit}", help="{digit} becomes a digit's name")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.md")
    args = parser.parse_args()

    backend = OnnxRuntimeBackend(ModelRepository(args.repository))
    models = discover_stable_diffusion(backend.models())[args.model]
    pipeline = StableDiffusionPipeline(backend, models)
    max_rows = backend.models()[models.unet].max_batch_size
    jobs = workload(args.clients, args.requests_per_client, args.prompt)
    asyncio.run(pipeline(jobs[0][0]))  # warm-up: first ONNX Runtime runs allocate
    modes = {"sequential": Sequential(pipeline), "request-level": RequestLevel(pipeline, max_rows),
             "step-level": StepLevel(pipeline, max_rows)}
    unet_work = {"calls": 0, "rows": 0}

    def count(model, _backend, batch, _seconds):
        if model == models.unet:
            unet_work["calls"] += 1
            unet_work["rows"] += batch

    backend.add_observer(count)
    rows = {}
    for name, mode in modes.items():
        unet_work.update(calls=0, rows=0)
        rows[name] = {**asyncio.run(run_mode(mode, jobs)), **{f"unet_{k}": v for k, v in unet_work.items()}}

    base, req = rows["sequential"]["images_per_s"], rows["request-level"]["images_per_s"]
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores)",
        "", f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
        f"{args.clients} clients x {args.requests_per_client} requests, steps 10-30, guidance {{1, 3, 5, 7.5}}, "
        f"DDIM, U-Net max batch {max_rows} rows", "",
        "| mode | requests | images/s | x sequential | x request-level | p50 s | p95 s | U-Net calls | U-Net rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['requests']} | {r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f} | "
                     f"{r['images_per_s'] / req:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['unet_calls']} | {r['unet_rows']} |")
    cost = unet_cost(pipeline)
    lines += ["", "U-Net ms per call by rows: " + ", ".join(f"{n}: {ms:.2f}" for n, ms in cost.items())]
    table = "\n".join(lines) + "\n\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
