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
  step-level, inline calls   the same, with ONNX Runtime calls of at most 5 ms run on the
                  event loop's thread instead of a worker (GENSERVE_ORT_INLINE_MS=5)
  step-level, ORT threads sleep / ORT 1 thread   the same on a backend whose ONNX Runtime
                  pool threads sleep between calls instead of spinning
                  (session.intra_op.allow_spinning=0), or that runs one intra-op thread
  step-level c=1  the engine with one client, one request at a time: its latency against
                  the sum of its model executions (the engine's own cost at concurrency 1);
                  also with the sleeping threads
The headline is *efficiency*: the U-Net rows a mode executed, priced at the best cost per
row measured in the same run (a table of ms per call for every batch size, timed before
and after the modes; the lower of the two per size), divided by the mode's wall time.
1.0 would be a machine doing nothing but U-Net work at its best batch size. Beside it:
images/s, p50/p95 latency, the ratios, the share of wall time spent in model executions,
and the non-model time per engine iteration. Appends the table with the command to
bench/results/engine.md; say with it whether the machine was quiet (`--note`).
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

from bench.report import append_report  # noqa: E402

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
        self.pipeline, self.max_rows, self.engine = pipeline, max_rows, None

    async def prepare(self):
        """Inside the mode's event loop, before its clock starts: warmed like the service."""
        self.engine = DiffusionEngine(self.pipeline, max_batch_rows=self.max_rows, max_queued_image_steps=10**9)
        await self.engine.warmup()

    async def __call__(self, req):
        return (await self.engine.generate(req, timeout_s=3600)).images

    @property
    def iterations(self) -> int:
        return self.engine.iterations if self.engine else 0


def unet_cost(pipeline, rows, repeats=15) -> dict[int, float]:
    """Milliseconds per U-Net call by batch rows (median of `repeats`, one event loop): how
    much batching can save here, and the price list efficiency is computed against."""
    m = pipeline.models
    spec = pipeline.backend.models()[m.unet]
    side = m.native_size // m.vae_scale_factor
    seq, hidden = spec.input("encoder_hidden_states").dims

    async def measure():
        cost = {}
        for n in rows:
            feeds = {"sample": np.zeros((n, m.latent_channels, side, side), np.float32),
                     "timestep": np.ones((n, 1), np.float32),
                     "encoder_hidden_states": np.zeros((n, seq, hidden), np.float32)}
            await pipeline.backend.infer(m.unet, feeds)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                await pipeline.backend.infer(m.unet, feeds)
                times.append(time.perf_counter() - t0)
            cost[n] = 1000 * statistics.median(times)
        return cost

    return asyncio.run(measure())


async def run_mode(mode, jobs, reset=lambda: None) -> dict:
    latencies, images = [], 0
    if hasattr(mode, "prepare"):
        await mode.prepare()
    reset()

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
    parser.add_argument("--single", type=int, default=8, help="requests for the step-level c=1 mode")
    parser.add_argument("--note", default="", help="written under the table: was the machine quiet?")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.md")
    args = parser.parse_args()

    work = {"calls": 0, "rows": 0, "unet_s": 0.0, "model_s": 0.0, "run_s": 0.0}

    class Timed:
        """A session whose run() adds its own duration to work["run_s"]: the model's time
        without the thread hand-off or anything else around it."""

        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            t0 = time.perf_counter()
            try:
                return self.session.run(names, feeds)
            finally:
                work["run_s"] += time.perf_counter() - t0

    def make_pipeline(**options):
        """The pipeline on its own embedded backend (ONNX Runtime `options`), its calls counted."""
        backend = OnnxRuntimeBackend(ModelRepository(args.repository), **options)
        models = discover_stable_diffusion(backend.models())[args.model]

        def count(model, _backend, batch, seconds):
            work["model_s"] += seconds
            if model == models.unet:
                work["calls"] += 1
                work["rows"] += batch
                work["unet_s"] += seconds

        backend.add_observer(count)
        pipeline = StableDiffusionPipeline(backend, models)
        return pipeline

    pipeline = make_pipeline()
    backend, models = pipeline.backend, pipeline.models
    max_rows = backend.models()[models.unet].max_batch_size
    jobs = workload(args.clients, args.requests_per_client, args.prompt)
    # ONNX Runtime's thread settings, chosen by measurement: its pool threads sleeping between
    # calls rather than spinning, and one thread per session (each its own backend).
    sleeping, one_thread = make_pipeline(allow_spinning=False), make_pipeline(intra_op_threads=1)
    for p in (pipeline, sleeping, one_thread):
        asyncio.run(p(jobs[0][0]))  # warm-up: first ONNX Runtime runs allocate
    sizes = sorted(set(range(1, max_rows + 1)))
    cost_before = unet_cost(pipeline, sizes)
    modes = {"sequential": Sequential(pipeline), "request-level": RequestLevel(pipeline, max_rows),
             "step-level": StepLevel(pipeline, max_rows), "step-level, inline calls": StepLevel(pipeline, max_rows),
             "step-level, ORT threads sleep": StepLevel(sleeping, max_rows),
             "step-level, ORT 1 thread": StepLevel(one_thread, max_rows),
             "step-level c=1": StepLevel(pipeline, max_rows),
             "step-level c=1, ORT threads sleep": StepLevel(sleeping, max_rows)}
    inline_s = getattr(backend, "inline_max_s", 0.0)  # the service's default
    single = [[r for reqs in jobs for r in reqs][:args.single]]
    for p in (pipeline, sleeping, one_thread):
        p.backend._sessions = {name: Timed(session) for name, session in p.backend._sessions.items()}
    rows = {}
    for name, mode in modes.items():
        backend.inline_max_s = 0.005 if "inline" in name else inline_s
        rows[name] = {**asyncio.run(run_mode(mode, single if "c=1" in name else jobs,
                                             reset=lambda: work.update(calls=0, rows=0, unet_s=0.0, model_s=0.0, run_s=0.0))),
                      **{f"unet_{k}": v for k, v in work.items()}}
        rows[name]["iterations"] = getattr(mode, "iterations", None)
    cost_after = unet_cost(pipeline, sizes)
    cost = {n: min(cost_before[n], cost_after[n]) for n in sizes}
    best_n = min(sizes, key=lambda n: cost[n] / n)
    per_row_s = cost[best_n] / best_n / 1000

    base, req = rows["sequential"]["images_per_s"], rows["request-level"]["images_per_s"]
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores)",
        "", f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
        f"{args.clients} clients x {args.requests_per_client} requests, steps 10-30, guidance {{1, 3, 5, 7.5}}, "
        f"DDIM, U-Net max batch {max_rows} rows; step-level c=1: the first {args.single} requests one after another", "",
        "| mode | requests | efficiency | images/s | x sequential | x request-level | p50 s | p95 s | U-Net calls "
        "| U-Net rows | U-Net time / wall | all models / wall | non-model ms / iteration |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        eff = r["unet_rows"] * per_row_s / r["wall_s"]
        its = r["iterations"] or r["unet_calls"]
        overhead = 1000 * (r["wall_s"] - r["unet_run_s"]) / its if its else float("nan")
        lines.append(f"| {name} | {r['requests']} | **{eff:.2f}** | {r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f} | "
                     f"{r['images_per_s'] / req:.2f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['unet_calls']} | "
                     f"{r['unet_rows']} | {r['unet_unet_s'] / r['wall_s']:.2f} | {r['unet_model_s'] / r['wall_s']:.2f} | "
                     f"{overhead:.2f} |")
    c1, c1s = rows["step-level c=1"], rows["step-level c=1, ORT threads sleep"]
    lines += ["", "U-Net time and all models: the backend's timing of each call (a worker-thread hand-off "
              "counts in it); non-model ms per iteration: wall minus the time inside ONNX Runtime's "
              "session.run (every model), per U-Net call: everything the engine, the event loop and the "
              "thread hand-offs add.",
              "", f"Best cost per row: {1000 * per_row_s:.3f} ms at {best_n} rows. "
              f"step-level c=1: client latency / sum of model executions = {c1['wall_s'] / c1['unet_model_s']:.3f} "
              f"({c1['wall_s']:.3f} s wall, {c1['unet_model_s']:.3f} s in backend calls, "
              f"{c1['unet_run_s']:.3f} s inside session.run: {c1['wall_s'] / c1['unet_run_s']:.3f}); "
              f"with ORT threads sleeping {c1s['wall_s'] / c1s['unet_model_s']:.3f}.",
              "", "U-Net ms per call by rows (before modes / after modes): "
              + ", ".join(f"{n}: {cost_before[n]:.2f}/{cost_after[n]:.2f}" for n in sizes)]
    if args.note:
        lines += ["", args.note]
    append_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
