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
  step-level      the DiffusionEngine (the service's settings: one ONNX Runtime thread pool
                  shared by every session; the overlapped loop: the next U-Net call starts as
                  soon as the last one's outputs are applied, the rest runs while it executes)
  step-level, no overlap   the same engine running its stages one after another
                  (GENSERVE_ENGINE_OVERLAP=0): the loop before the overlap
  step-level, inline calls   the same, with ONNX Runtime calls of at most 5 ms run on the
                  event loop's thread instead of a worker (GENSERVE_ORT_INLINE_MS=5)
  step-level, ORT per-session pools / threads sleep / 1 thread   the same on a backend
                  with a thread pool per session (ONNX Runtime's default), spinning or
                  sleeping between calls (session.intra_op.allow_spinning=0), or one intra-op
                  thread per session
  step-level c=1  the engine with one client, one request at a time: its latency against
                  the sum of its model executions (the engine's own cost at concurrency 1);
                  also with per-session pools and with sleeping threads
`--rounds N` runs the step-level modes N times, interleaved; `--modes` picks some of them.
The headline is *efficiency*: the U-Net rows a mode executed, priced at the best cost per
row, divided by the mode's wall time. 1.0 would be a machine doing nothing but U-Net work
at its best batch size. The price is measured *while the mode runs*: this VM's speed drifts
by up to 2x in phases of one to a few seconds (the same call back to back: 4.2 ms for
2 s, then 6.3, then 8.4), so a price list timed before the run compares a fast phase with
a slow one. Every PROBE_EVERY_S, the U-Net's worker thread first runs one reference call
(the best batch size of a start-up table, fixed inputs) right before the mode's own call;
each of the mode's calls is priced at the median of the PROBE_NEAREST probes nearest to it
in time, and the probes' time is taken out of the wall and of images/s (not out of the
latencies, nor out of the call timings the engine itself sees: its cost model and the
backend's inline estimate read about one call in ten as slower by a probe). A mode is priced against its own
backend's probes: efficiency is the share of the wall that is U-Net work at the best batch
size *under that mode's thread settings*; images/s compares the settings themselves.
Two figures: over the whole run, and over the window in which all clients are still
sending (16 concurrent requests: the run's tail, where the last clients finish alone, is
a property of the workload, not of the engine). Beside them: images/s, p50/p95 latency,
the ratios, rows per U-Net call, the share of wall time in model executions, and the
non-model time per engine iteration. Appends the table with the command to
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
from services.config import Settings  # noqa: E402
from services.engine.engine import DiffusionEngine, EngineConfig  # noqa: E402
from services.pipelines.controlnet import zero_residuals  # noqa: E402
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
            try:
                await self._serve(group)
            except Exception as exc:  # the callers see it (a silent worker would leave them waiting)
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)

    async def _serve(self, group):
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
            out, _ = await self.pipeline.denoise(merged)  # the pipeline's call: control inputs filled
            o = 0
            for t in trajectories:
                if not t.done:
                    t.advance(out[o:o + t.rows])
                o += t.rows
        images = await self.pipeline.decode(np.concatenate([t.decoder_input() for t in trajectories]))
        o = 0
        for (r, future), _ in zip(group, trajectories):
            future.set_result(images[o:o + r.num_images])
            o += r.num_images


class StepLevel:
    def __init__(self, pipeline, max_rows: int, overlap: bool = True):
        self.pipeline, self.max_rows, self.overlap, self.engine = pipeline, max_rows, overlap, None

    async def prepare(self):
        """Inside the mode's event loop, before its clock starts: warmed like the service."""
        self.engine = DiffusionEngine(self.pipeline, EngineConfig(self.max_rows, 10**9, overlap=self.overlap))
        await self.engine.warmup()

    async def __call__(self, req):
        return (await self.engine.generate(req, timeout_s=3600)).images

    @property
    def iterations(self) -> int:
        return self.engine.iterations if self.engine else 0


PROBE_EVERY_S = 0.1  # a reference U-Net call this often during a mode (its time is taken out of the wall)
PROBE_NEAREST = 5  # a call is priced at the median of this many probes nearest to it in time


def unet_feeds(pipeline, rows: int) -> dict[str, np.ndarray]:
    m = pipeline.models
    spec = pipeline.backend.models()[m.unet]
    height, width = m.native_height // m.vae_scale_factor, m.native_width // m.vae_scale_factor
    seq, hidden = spec.input("encoder_hidden_states").dims
    return {"sample": np.zeros((rows, m.latent_channels, height, width), np.float32),
            "timestep": np.ones((rows, 1), np.float32),
            "encoder_hidden_states": np.zeros((rows, seq, hidden), np.float32),
            **zero_residuals(spec, rows, height, width)}


def unet_cost(pipeline, rows, repeats=15) -> dict[int, float]:
    """Milliseconds per U-Net call by batch rows: how much batching can save here, and which
    batch size the probes use. `repeats` rounds over every size, each size's median: sizes
    interleaved, so that a drift in the machine's speed lands on all of them alike."""
    m = pipeline.models

    async def measure():
        feeds = {n: unet_feeds(pipeline, n) for n in rows}
        times = {n: [] for n in rows}
        for round_ in range(1 + repeats):  # the first round untimed: a size's first call allocates
            for n in rows:
                t0 = time.perf_counter()
                await pipeline.backend.infer(m.unet, feeds[n], ["noise_pred"])
                if round_:
                    times[n].append(time.perf_counter() - t0)
        return {n: 1000 * statistics.median(t) for n, t in times.items()}

    return asyncio.run(measure())


class Timed:
    """A session whose run() adds its own duration to work["run_s"]: the model's time
    without the thread hand-off or anything else around it. For the U-Net (`probe` feeds
    given), each call is also logged (start, rows, seconds), and every PROBE_EVERY_S a
    reference call with the probe feeds runs first, in the same thread: the best price per
    row at that moment, logged in work["probes"] and not counted in the call's time."""

    def __init__(self, session, work: dict, probe: dict[str, np.ndarray] | None = None):
        self.session, self.work, self.probe = session, work, probe
        self.last_probe = 0.0

    def run(self, names, feeds, *run_options):
        work = self.work
        if self.probe is not None and time.perf_counter() - self.last_probe >= PROBE_EVERY_S:
            # Right before the call, in its thread: the same conditions as the call. (A pause
            # first made the probes slower: the pool threads had gone to sleep.)
            t0 = time.perf_counter()
            self.session.run(["noise_pred"], self.probe)
            self.last_probe = t1 = time.perf_counter()
            work["probes"].append((t0, t1 - t0))
        t0 = time.perf_counter()
        try:
            return self.session.run(names, feeds, *run_options)
        finally:
            took = time.perf_counter() - t0
            work["run_s"] += took
            if self.probe is not None:
                work["unet_log"].append((t0, len(next(iter(feeds.values()))), took))


def fresh_work() -> dict:
    return {"calls": 0, "rows": 0, "unet_s": 0.0, "model_s": 0.0, "run_s": 0.0, "probes": [], "unet_log": []}


def efficiency(work: dict, start: float, end: float, probe_rows: int) -> float:
    """The U-Net rows of calls started in [start, end), each priced at the median cost per row
    of the PROBE_NEAREST probes nearest to it, over that window's wall time less the probes'
    own time."""
    probes = work["probes"]
    if not probes:
        return float("nan")
    at = np.array([t for t, _ in probes])
    per_row = np.array([s for _, s in probes]) / probe_rows
    ideal = 0.0
    for t, rows, _ in work["unet_log"]:
        if start <= t < end:
            ideal += rows * np.median(per_row[np.argsort(np.abs(at - t))[:PROBE_NEAREST]])
    probing = sum(s for t, s in probes if start <= t < end)
    return ideal / (end - start - probing)


async def run_mode(mode, jobs, reset=lambda: None, probes=list) -> dict:
    """`probes()`: the reference calls made during the mode, (start, seconds): out of images/s
    (the latencies include those that fell inside a request)."""
    latencies, images, client_done = [], 0, []
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
        client_done.append(time.perf_counter())

    start = time.perf_counter()
    await asyncio.gather(*(client(reqs) for reqs in jobs))
    end = time.perf_counter()
    latencies.sort()
    probing = sum(s for t, s in probes() if start <= t < end)  # not the mode's work
    return {"images_per_s": images / (end - start - probing), "probe_s": probing, "p50_s": statistics.median(latencies),
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))], "wall_s": end - start, "requests": len(latencies),
            "start": start, "end": end, "all_sending_until": min(client_done)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="sd_digits")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--prompt", default="a handwritten digit {digit}", help="{digit} becomes a digit's name")
    parser.add_argument("--single", type=int, default=8, help="requests for the step-level c=1 mode")
    parser.add_argument("--note", default="", help="written under the table: was the machine quiet?")
    parser.add_argument("--modes", default="",
                        help="semicolon-separated step-level modes to run (default all), "
                             "e.g. 'step-level;step-level c=1'")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the step-level modes this many times, interleaved (rows named #1, #2, ...)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.md")
    args = parser.parse_args()

    work = fresh_work()

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

    # ONNX Runtime's thread settings, chosen by measurement (each its own backend): a pool per
    # session, spinning (ONNX Runtime's default) or sleeping between calls, and one thread per
    # session; the service's default is one pool shared by all sessions. (ONNX Runtime opens no
    # per-session pool after its shared one exists: those backends come first.)
    per_session = make_pipeline(shared_threads=False)
    sleeping = make_pipeline(allow_spinning=False, shared_threads=False)
    one_thread = make_pipeline(intra_op_threads=1, shared_threads=False)
    pipeline = make_pipeline(shared_threads=Settings().ort.thread_pool == "shared")  # as the service runs
    backend, models = pipeline.backend, pipeline.models
    max_rows = backend.models()[models.unet].max_batch_size
    jobs = workload(args.clients, args.requests_per_client, args.prompt)
    pipelines = (pipeline, per_session, sleeping, one_thread)
    for p in pipelines:
        asyncio.run(p(jobs[0][0]))  # warm-up: first ONNX Runtime runs allocate
    sizes = sorted(set(range(1, max_rows + 1)))
    cost_before = unet_cost(pipeline, sizes)
    probe_rows = min(sizes, key=lambda n: cost_before[n] / n)
    modes = {"sequential": Sequential(pipeline), "request-level": RequestLevel(pipeline, max_rows),
             "step-level": StepLevel(pipeline, max_rows),
             "step-level, no overlap": StepLevel(pipeline, max_rows, overlap=False),
             "step-level, inline calls": StepLevel(pipeline, max_rows),
             "step-level, ORT per-session pools": StepLevel(per_session, max_rows),
             "step-level, ORT threads sleep": StepLevel(sleeping, max_rows),
             "step-level, ORT 1 thread": StepLevel(one_thread, max_rows),
             "step-level c=1": StepLevel(pipeline, max_rows),
             "step-level c=1, ORT per-session pools": StepLevel(per_session, max_rows),
             "step-level c=1, ORT threads sleep": StepLevel(sleeping, max_rows)}
    inline_s = getattr(backend, "inline_max_s", 0.0)  # the service's default
    single = [[r for reqs in jobs for r in reqs][:args.single]]
    for p in pipelines:
        spec = p.backend.models()[p.models.unet]  # the session's own shapes (Triton's reshape applied)
        probe = {t.name: x.reshape((probe_rows, *t.reshape)) if t.reshape is not None else x
                 for t, x in ((spec.input(k), v) for k, v in unet_feeds(p, probe_rows).items())}
        p.backend._sessions = {name: Timed(session, work, probe if name == p.models.unet else None)
                               for name, session in p.backend._sessions.items()}
    if args.modes:  # sequential and request-level always run: the ratios are against them
        keep = {m.strip() for m in args.modes.split(";")} | {"sequential", "request-level", "step-level c=1",
                                                              "step-level c=1, ORT per-session pools"}
        unknown = keep - set(modes)
        if unknown:
            parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(modes)}")
        modes = {n: m for n, m in modes.items() if n in keep}
    schedule = list(modes.items())
    if args.rounds > 1:  # sequential and request-level once; the engine's modes round by round
        step_modes = [(n, m) for n, m in schedule if n.startswith("step-level")]
        schedule = [(n, m) for n, m in schedule if not n.startswith("step-level")]
        schedule += [(f"{n} #{i + 1}", m) for i in range(args.rounds) for n, m in step_modes]
    rows = {}
    for name, mode in schedule:
        print(f"{time.strftime('%H:%M:%S')} {name}", file=sys.stderr, flush=True)
        backend.inline_max_s = 0.005 if "inline" in name else inline_s
        r = asyncio.run(run_mode(mode, single if "c=1" in name else jobs,
                                 reset=lambda: work.update(fresh_work()), probes=lambda: work["probes"]))
        r["efficiency"] = efficiency(work, r["start"], r["end"], probe_rows)
        r["efficiency_all_sending"] = efficiency(work, r["start"], r["all_sending_until"], probe_rows)
        rows[name] = {**r, **{f"unet_{k}": v for k, v in work.items()}}
        # The probes run inside the backend's timed calls: out of the model times as out of the wall.
        rows[name]["unet_unet_s"] -= r["probe_s"]
        rows[name]["unet_model_s"] -= r["probe_s"]
        rows[name]["iterations"] = getattr(mode, "iterations", None)
    for p in pipelines:  # the raw sessions again: no probes in the table after the modes
        p.backend._sessions = {name: t.session for name, t in p.backend._sessions.items()}
    cost_after = unet_cost(pipeline, sizes)

    base, req = rows["sequential"]["images_per_s"], rows["request-level"]["images_per_s"]
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} "
        f"({platform.machine()}, {__import__('os').cpu_count()} cores)",
        "", f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
        f"{args.clients} clients x {args.requests_per_client} requests, steps 10-30, guidance {{1, 3, 5, 7.5}}, "
        f"DDIM, U-Net max batch {max_rows} rows; step-level c=1: the first {args.single} requests "
        "one after another", "",
        "| mode | requests | efficiency, all clients sending | efficiency, whole run | images/s | x sequential "
        "| x request-level | p50 s | p95 s | U-Net calls | U-Net rows | rows / call | U-Net time / wall "
        "| all models / wall | non-model ms / iteration | reference ms / row |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        wall = r["wall_s"] - r["probe_s"]
        its = r["iterations"] or r["unet_calls"]
        overhead = 1000 * (wall - r["unet_run_s"]) / its if its else float("nan")
        lines.append(f"| {name} | {r['requests']} | **{r['efficiency_all_sending']:.2f}** | "
                     f"**{r['efficiency']:.2f}** | "
                     f"{r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f} | "
                     f"{r['images_per_s'] / req:.2f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['unet_calls']} | "
                     f"{r['unet_rows']} | {r['unet_rows'] / max(1, r['unet_calls']):.1f} | "
                     f"{r['unet_unet_s'] / wall:.2f} | {r['unet_model_s'] / wall:.2f} | {overhead:.2f} | "
                     f"{1000 * statistics.median([s for _, s in r['unet_probes']] or [float('nan')]) / probe_rows:.3f}"
                     " |")
    suffix = " #1" if args.rounds > 1 else ""
    c1, c1s = rows["step-level c=1" + suffix], rows["step-level c=1, ORT per-session pools" + suffix]
    c1_wall = c1["wall_s"] - c1["probe_s"]
    probe_ms = [1000 * s / probe_rows for r in rows.values() for _, s in r["unet_probes"]]
    lines += ["", f"Efficiency: rows priced at the median cost per row of the {PROBE_NEAREST} reference calls "
              f"nearest in time (a {probe_rows}-row call every {PROBE_EVERY_S * 1000:.0f} ms of each mode, "
              "in the U-Net's worker thread; the probes' time is out of every wall figure). "
              "U-Net time and all models: the "
              "backend's timing of each call (a worker-thread hand-off counts in it); non-model ms per "
              "iteration: wall minus the time inside ONNX Runtime's session.run (every model), per U-Net "
              "call: everything the engine, the event loop and the thread hand-offs add.",
              "", f"Reference cost per row over the run ({len(probe_ms)} probes of {probe_rows} rows): "
              f"median {statistics.median(probe_ms):.3f} ms, 10th-90th percentile "
              f"{np.percentile(probe_ms, 10):.3f}-{np.percentile(probe_ms, 90):.3f} ms. "
              f"step-level c=1: client latency / sum of model executions = {c1_wall / c1['unet_model_s']:.3f} "
              f"({c1_wall:.3f} s wall, {c1['unet_model_s']:.3f} s in backend calls, "
              f"{c1['unet_run_s']:.3f} s inside session.run: {c1_wall / c1['unet_run_s']:.3f}); "
              f"with per-session pools {(c1s['wall_s'] - c1s['probe_s']) / c1s['unet_model_s']:.3f}.",
              "", "U-Net ms per call by rows (before modes / after modes): "
              + ", ".join(f"{n}: {cost_before[n]:.2f}/{cost_after[n]:.2f}" for n in sizes)]
    if args.note:
        lines += ["", args.note]
    append_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
