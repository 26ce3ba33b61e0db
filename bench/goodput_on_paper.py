"""Goodput on one H100 with TensorRT plans, on paper: bench_goodput.py's mix and method run through
a simulation priced with published per-step costs, for the systems the bench compares.

    .venv/bin/python bench/goodput_on_paper.py [--requests 4000]

What it models. The mix is bench_goodput.py's (its MIX at 512 and 768 px: an SD 1.5 served at
its native size and 1.5x), arrivals are seeded Poisson, each request's SLO is 3x its latency
alone, and goodput is the highest rate of a ladder at which >= 99% of requests meet it (the
bench's reading, interpolated the same way). The device runs one call at a time; a call's cost:

  U-Net, one step       COST_512_MS x (rows / 2) ** ROW_EXPONENT, x PIXELS_768 at 768 px
  VAE decode, an image  VAE_512_MS (x PIXELS_768 at 768 px); previews the same; img2img's
                        encode at half of it
  text encoder          CLIP_MS per call
  the host's loop       LOOP_MS per engine iteration on the critical path (measured here:
                        bench_engine_overhead.py --loop --device-ms 5, overlapped and not)

Sources (per-step costs as published; read them in bench/README.md's GPU section):
  - SD 1.5 at 512 px, A100 80 GB, TensorRT 9, fp16, 50 steps, batch 1 with guidance: 0.819 s
    a request, 61.14 it/s (fal-ai/stable-diffusion-benchmarks, README.md): 16.4 ms a step.
  - H100 against A100 on the same TensorRT SDXL U-Net: 1772 ms against 3359 ms for 40 steps
    (stabilityai/stable-diffusion-xl-1.0-tensorrt, README at 6bae04c): 1.9x. So SD 1.5 on an
    H100: 16.4 / 1.9 = 8.6 ms a guided step (2 rows) — an estimate, no SD 1.5 H100 figure
    was found.
  - Batch growth on an H100 (NVIDIA NeMo, docs/source/multimodal/text2img/sdxl_quantization.rst,
    SDXL fp16, TensorRT 9.3): batch 1 / 2 / 4 images take 1724 / 3004 / 5657 ms: 4 images cost
    3.28x one, rows ** 0.857. At these sizes a GPU is nearly saturated by one image: batching
    saves at most 1.2-1.4x per row, where the 2-core CPU's demo U-Net saves 2.6x.
  - VAE decode, H100, TensorRT: 30.35 ms at 512 px (stabilityai/sdxl-turbo-tensorrt README);
    CLIP: 0.78 ms (the same page).

Systems: genserve (step batching across steps, guidance and schedulers, requests join and leave
between steps, up to MAX_ROWS rows a call, the loop overlapped), genserve without the overlap
(the loop's host time per iteration of the stage-after-stage loop), step batching on matching
parameters only, request-level batching (a batch runs to its end) and one at a time. Not
modelled: the HTTP and PNG work on the host (off the device's path with the overlapped loop;
on the path of the others' single-threaded servers), decodes and previews running beside a
U-Net call on the device (here they take their turn: pessimistic), Triton's dynamic batcher,
and the fair policy's share of rows for first steps, deadlines and tenants (its main order, first
steps then least remaining work with aging, is modelled). Appends to
bench/results/goodput_gpu_paper.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_goodput import SLO_FACTOR, TARGET_SHARE, mix  # noqa: E402
from bench.report import append_report  # noqa: E402
from services.engine.scheduler import STRETCH  # noqa: E402

COST_512_MS = 16.4 / 1.9  # a guided SD 1.5 U-Net step (2 rows) at 512 px on an H100 with TensorRT
ROW_EXPONENT = 0.857  # a call of n rows costs (n / 2) ** this x a 2-row call (NeMo, SDXL on an H100)
PIXELS_768 = 768 ** 2 / 512 ** 2
VAE_512_MS = 30.35
CLIP_MS = 0.78
MAX_ROWS = 16  # MLPerf's SDXL Server configuration on an H100: U-Net batch 8 x 2
# The engine's host time per iteration on the device's critical path (bench_engine_overhead.py --loop
# --device-ms 5: 1.2-1.5 ms overlapped, 2.3-2.7 ms stage after stage). The other systems run on the
# same engine in bench_goodput.py, so they get the overlapped figure (generous to the serial servers).
LOOP_MS = {"genserve": 1.4, "no-overlap": 2.7}
RATES = (0.1, 0.15, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 5, 6)


@dataclass(eq=False)
class Job:
    cls: int
    arrival: float
    steps: int
    rows: int  # 2 with guidance
    size: int
    previews: list[int]  # steps after which a preview is decoded
    encode_ms: float  # img2img's VAE encode
    key: tuple  # what a matching-parameters or request-level server requires to match
    done_steps: int = 0
    admitted: bool = False
    finish: float = 0.0


def unet_ms(size: int, rows: int) -> float:
    return COST_512_MS * (PIXELS_768 if size == 768 else 1.0) * (rows / 2) ** ROW_EXPONENT


def vae_ms(size: int) -> float:
    return VAE_512_MS * (PIXELS_768 if size == 768 else 1.0)


def jobs_of(classes, rate: float, n: int, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    weights = np.array([c.weight for c in classes], float)
    arrivals = np.cumsum(rng.exponential(1000.0 / rate, n))  # ms
    out = []
    for t, c in zip(arrivals, rng.choice(len(classes), n, p=weights / weights.sum())):
        p = classes[c].params
        guided = p["guidance_scale"] > 1.0
        image = classes[c].path == "/v1/img2img"
        steps = int(p["num_inference_steps"] * p["strength"]) if image else p["num_inference_steps"]
        size = p.get("height", 512)
        every = p.get("preview_every", 0)
        step_key = (size, p["guidance_scale"] if guided else None, p["scheduler"])  # bench_policies' rules
        out.append(Job(int(c), float(t), steps, 2 if guided else 1, size,
                       list(range(every, steps, every)) if every else [], vae_ms(size) / 2 if image else 0.0,
                       (*step_key, p["num_inference_steps"], p.get("strength") if image else None)))
    return out


def alone_ms(job: Job, loop_ms: float) -> float:
    """The request alone on the device (its SLO's base)."""
    return (CLIP_MS + job.encode_ms + job.steps * (unet_ms(job.size, job.rows) + loop_ms)
            + vae_ms(job.size) * (1 + len(job.previews)))


def serve(jobs: list[Job], system: str) -> None:
    """One device, one call at a time: sets each job's finish time (ms)."""
    loop = LOOP_MS.get(system, LOOP_MS["genserve"])
    pending = list(jobs)  # by arrival
    running: list[Job] = []
    now, i = 0.0, 0
    cohort: list[Job] = []
    while i < len(pending) or running:
        if not running and i < len(pending) and pending[i].arrival > now:
            now = pending[i].arrival
        while i < len(pending) and pending[i].arrival <= now:  # admitted: prompt encoded (one call for all)
            running.append(pending[i])
            i += 1
        new = [j for j in running if not j.admitted]
        if new:
            now += CLIP_MS + sum(j.encode_ms for j in new)
            for j in new:
                j.admitted = True
        if system == "serial":
            batch = [running[0]]
        elif system == "request":
            cohort = [j for j in cohort if j.done_steps < j.steps]
            if not cohort:
                head = running[0]
                cohort = [j for j in running if j.key == head.key]
                cohort = fit(cohort)
            batch = cohort
        else:  # the engine's fair order (services/engine/scheduler.py), its main terms
            order = sorted(running, key=lambda j: fair_key(j, loop))
            head = order[0]
            batch = fit([j for j in order if (j.key[:3] == head.key[:3] if system == "matching"
                                              else j.size == head.size)])
        rows = sum(j.rows for j in batch)
        now += unet_ms(batch[0].size, rows) + loop
        finished = []
        for j in batch:
            j.done_steps += 1
            if j.done_steps in j.previews:
                now += vae_ms(j.size)
            if j.done_steps == j.steps:
                finished.append(j)
        for size in {j.size for j in finished}:  # one VAE call per shape
            now += vae_ms(size) * sum(1 for j in finished if j.size == size) ** ROW_EXPONENT
        for j in finished:
            j.finish = now
            running.remove(j)


def fair_key(j: Job, loop_ms: float) -> tuple:
    """First steps first (arrival order), then the virtual deadline: arrival + STRETCH x the
    request's remaining steps alone (the deadline and tenant terms do not arise here)."""
    if j.done_steps == 0:
        return (0, j.arrival)
    return (2, j.arrival + STRETCH * (j.steps - j.done_steps) * (unet_ms(j.size, j.rows) + loop_ms))


def fit(candidates: list[Job]) -> list[Job]:
    """In the given order, up to MAX_ROWS rows (the first always runs)."""
    out, rows = [], 0
    for j in candidates:
        if out and rows + j.rows > MAX_ROWS:
            continue
        out.append(j)
        rows += j.rows
    return out


def measure(classes, system: str, rate: float, n: int, seed: int) -> tuple[float, float, float]:
    jobs = jobs_of(classes, rate, n, seed)
    slo = [SLO_FACTOR * alone_ms(j, LOOP_MS["genserve"]) for j in jobs]  # the user's target: genserve alone
    serve(jobs, system)
    latency = np.array([j.finish - j.arrival for j in jobs])
    share = float(np.mean(latency <= np.array(slo)))
    return share, float(np.percentile(latency, 50)), float(np.percentile(latency, 99))


def goodput(points: list[tuple[float, float]]) -> float:
    passing = [k for k, (_, share) in enumerate(points) if share >= TARGET_SHARE]
    if not passing:
        return 0.0
    k = passing[-1]
    if k == len(points) - 1:
        return points[k][0]
    (r0, s0), (r1, s1) = points[k], points[k + 1]
    return r0 + (r1 - r0) * (s0 - TARGET_SHARE) / (s0 - s1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000, help="simulated requests per rate")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "goodput_gpu_paper.md")
    args = parser.parse_args()
    classes = mix(512, 768)
    systems = ("genserve", "no-overlap", "matching", "request", "serial")
    table = {s: [(rate, *measure(classes, s, rate, args.requests, seed=int(rate * 1000))) for rate in RATES]
             for s in systems}
    found = {s: goodput([(r, share) for r, share, _, _ in rows]) for s, rows in table.items()}
    weights = np.array([c.weight for c in classes], float)
    mean_alone = float(np.dot(weights / weights.sum(), [alone_ms(j, 0.0) for j in
                                                          [jobs_of([c], 1.0, 1, 0)[0] for c in classes]]))
    lines = ["## On paper: SD 1.5 on one H100 with TensorRT plans (bench/goodput_on_paper.py)", "",
             f"`python bench/goodput_on_paper.py --requests {args.requests}`", "",
             f"A guided step {COST_512_MS:.1f} ms at 512 px, rows ** {ROW_EXPONENT}, VAE {VAE_512_MS} ms, CLIP "
             f"{CLIP_MS} ms, host loop {LOOP_MS['genserve']} ms (overlapped) / {LOOP_MS['no-overlap']} ms per "
             f"iteration, up to {MAX_ROWS} rows a call. The mix's mean device time alone: {mean_alone:.0f} ms "
             f"(one at a time at most {1000 / mean_alone:.1f} requests/s); sources in the script's docstring.", "",
             "| system | goodput, requests/s | x genserve |", "|---|---:|---:|"]
    for s in systems:
        lines.append(f"| {s} | **{found[s]:.2f}** | {found[s] / found['genserve']:.2f} |")
    lines += ["", "| system | " + " | ".join(f"{r:g}/s" for r in RATES) + " |", "|---|" + "---:|" * len(RATES)]
    for s, rows in table.items():
        lines.append(f"| {s} within SLO, p99 s | " + " | ".join(
            f"{100 * share:.0f}%, {p99 / 1000:.2f}" for _, share, _, p99 in rows) + " |")
    append_report(args.out, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
