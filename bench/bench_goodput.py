"""Goodput at an SLO: how many requests per second can be sent with (nearly) every one answered
within its latency target, for genserve and for what a user would run instead, in one run.

    .venv/bin/python bench/bench_goodput.py --seconds 10 --note "quiet machine"

The method is MLPerf Inference's Server scenario (seeded Poisson arrivals, open loop: a slow
answer does not slow the sender) with vLLM-Omni's SLO (RFC #290): each request's target is
SLO_FACTOR x its standalone latency, measured in the same run on the quiet service (one request
at a time, nothing else sent). Per arrival rate of a ladder, per system: the share of requests
within their SLO, p50/p99 latency, p99 time to the first preview (streams), images/s. A
system's **goodput** is the highest rate at which >= 99% of requests meet their SLO,
interpolated linearly between the highest rung that passes and the next one up. With fewer
than 100 requests at a rung, >= 99% means none missed.

The mix (MIX below; one request's class drawn by weight, its prompt names a random digit):
txt2img at 4-50 steps, guidance off (1.0) and on (3-7.5), DDIM and Euler, 32 and 48 px; some
as server-sent-event streams with previews; some img2img at two strengths. Every system gets
the same arrival times and requests at a given rate (seeded by the rate).

Systems, all on the same model (model_repository/'s sd_digits, exported from
zoo/checkpoints/sd_digits) and the same 2 cores:
  genserve   the service: step-level batching across steps, guidance and schedulers, the
             engine loop overlapping its work with the U-Net call (services/engine;
             GENSERVE_ENGINE_OVERLAP=1, which `auto` chooses on Triton, not on the embedded CPU backend)
  no-overlap the same service with the engine's stages one after another (the loop before the
             overlap)                                              GENSERVE_ENGINE_OVERLAP=0
  matching   the same service with step batching restricted to matching size, guidance and
             scheduler (vLLM-Omni's, SGLang's step modes)          GENSERVE_BENCH_POLICY=matching
  request    request-level batching: a batch of requests one pipeline call could take, run to
             its end (SGLang's dynamic batching)                   GENSERVE_BENCH_POLICY=request
  serial     one request at a time (ComfyUI, BentoDiffusion, the Triton SD tutorial)
                                                                   GENSERVE_BENCH_POLICY=serial
  diffusers  diffusers' own pipeline (torch, CPU) on the diffusers folder behind a minimal
             concurrent server (bench/peer_diffusers.py, the server-async pattern)
Not a row: optimum-onnx's ONNX Runtime pipeline. Its only release (0.1.0) requires
transformers>=4.36,<4.58 and optimum~=2.1.0: `pip install --dry-run "optimum-onnx[onnxruntime]"`
would replace transformers 5.23.0 (pinned in pyproject.toml) with 4.57.6, huggingface_hub 2.4.0
with 0.36.2 and tokenizers 0.23.3 with 0.22.2 (checked 2026-12-07), so it cannot run beside the pins.
GENSERVE_BENCH_POLICY is for this benchmark only (services/engine/bench_policies.py). A lone
request runs the same code under every policy, so the engine's systems share genserve's
standalone latencies; the diffusers peer's are measured too, and its rows show the share within
both targets: genserve's (the user's target, the headline) and 3x its own standalone latency.

Rungs: the --rates ladder. A system starts at the highest rung at or below START_FRACTION of its
standalone capacity (1 / its mean standalone latency over the mix; lower rungs are not run) and
climbs until a rung's share falls below --stop-below or the ladder ends; if no rung from the start
up passed, it then runs the rungs below the start, down to the first that passes. Systems run their rungs
round by round, interleaved in rotating order, so that a drift in the machine's speed lands on
all of them. Each rung sends max(--min-requests, rate x --seconds) requests, at most
--max-requests; a request still unanswered GIVE_UP x its SLO after its arrival is cancelled
(the connection closed) and counted as a miss with that latency as a lower bound (">").

Beside it: the outside burst efficiency. 16 mixed txt2img (10/17/24 steps, guidance 1-5) sent
at once over HTTP, the wall time until the last image against the U-Net rows they need priced
at the U-Net's best cost per row measured in this process in the same run (ONNX Runtime, before
and after the bursts) — for each engine system, --bursts rounds interleaved; and the in-process
figure of bench/bench_engine.py (its step-level mode at 16 clients, run here as a subprocess).

Appends the tables, the command and the load average before and after to
bench/results/goodput.md; say with --note whether the machine was quiet.

On a GPU host (one command; a Triton serving the exported SD 1.5 repository with TensorRT
plans at localhost:8001, its diffusers folder beside it):

    python bench/bench_goodput.py --repository /models/sd15 --sizes 512,768 \
        --service-env GENSERVE_BACKEND=triton --service-env GENSERVE_TRITON_URL=localhost:8001 \
        --service-env GENSERVE_DEFAULT_DIFFUSION_MODEL=sd15 --peer-folder /models/sd15-diffusers \
        --peer-device cuda --rates 0.5,1,2,3,4,6,8,12 --bursts 0 --no-in-process \
        --note "1x H100, TensorRT plans"

(--bursts 0 and --no-in-process: those price the U-Net with this process's ONNX Runtime on the
CPU, which says nothing about the GPU.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_request_breakdown import execution_seconds, load_average  # noqa: E402
from bench.report import append_report  # noqa: E402
from services.engine.bench_policies import BENCH_POLICIES, BENCH_POLICY_ENV  # noqa: E402
from tests.fixtures.local_server import LocalServer, free_port  # noqa: E402

SLO_FACTOR = 3.0
TARGET_SHARE = 0.99
START_FRACTION = 0.3
GIVE_UP = 2.0  # x the SLO: past this a request is a miss whatever happens next (bounds a rung's drain)
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class RequestClass:
    name: str
    weight: int
    path: str  # /v1/txt2img, /v1/txt2img/stream or /v1/img2img
    params: dict


def txt(steps, guidance, scheduler, size=32, **extra) -> dict:
    return {"num_inference_steps": steps, "guidance_scale": guidance, "scheduler": scheduler,
            "height": size, "width": size, **extra}


def mix(small: int = 32, large: int = 48) -> list[RequestClass]:
    """The fixed mix at two output sizes (the demo's 32 and 48 px; 512 and 768 for SD 1.5)."""
    return [
        RequestClass(f"txt2img {small}px 4 steps unguided ddim", 3, "/v1/txt2img", txt(4, 1.0, "ddim", small)),
        RequestClass(f"txt2img {small}px 8 steps g3 euler", 2, "/v1/txt2img", txt(8, 3.0, "euler", small)),
        RequestClass(f"txt2img {small}px 20 steps g7.5 ddim", 3, "/v1/txt2img", txt(20, 7.5, "ddim", small)),
        RequestClass(f"txt2img {small}px 30 steps g5 euler", 2, "/v1/txt2img", txt(30, 5.0, "euler", small)),
        RequestClass(f"txt2img {small}px 50 steps g7.5 ddim", 1, "/v1/txt2img", txt(50, 7.5, "ddim", small)),
        RequestClass(f"txt2img {large}px 12 steps unguided euler", 1, "/v1/txt2img", txt(12, 1.0, "euler", large)),
        RequestClass(f"txt2img {large}px 25 steps g5 ddim", 1, "/v1/txt2img", txt(25, 5.0, "ddim", large)),
        RequestClass(f"stream {small}px 20 steps g5 euler, preview every 5", 2, "/v1/txt2img/stream",
                     txt(20, 5.0, "euler", small, preview_every=5)),
        RequestClass(f"stream {large}px 30 steps g3 ddim, preview every 10", 1, "/v1/txt2img/stream",
                     txt(30, 3.0, "ddim", large, preview_every=10)),
        # img2img at the init image's size (`small`)
        RequestClass(f"img2img {small}px 20 steps strength 0.6 g5 ddim", 2, "/v1/img2img",
                     {"num_inference_steps": 20, "strength": 0.6, "guidance_scale": 5.0, "scheduler": "ddim"}),
        RequestClass(f"img2img {small}px 40 steps strength 0.5 unguided euler", 1, "/v1/img2img",
                     {"num_inference_steps": 40, "strength": 0.5, "guidance_scale": 1.0, "scheduler": "euler"}),
    ]


MIX = mix()  # main() sets the sizes (--sizes) in place
WEIGHTS = np.array([c.weight for c in MIX], float) / sum(c.weight for c in MIX)
ENGINE_SYSTEMS = ("genserve", "no-overlap", *BENCH_POLICIES)
SYSTEMS = (*ENGINE_SYSTEMS, "diffusers")


def init_image(size: int = 32) -> str:
    """A fixed input for img2img: a smooth seeded pattern, base64 PNG."""
    rng = np.random.default_rng(7)
    low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(low).resize((size, size), Image.BICUBIC).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def body(cls: RequestClass, seed: int, digit: int, image: str) -> dict:
    out = {"prompt": f"a handwritten digit {DIGITS[digit]}", "seed": seed, **cls.params}
    if cls.path == "/v1/img2img":
        out["image"] = image
    return out


@dataclass
class Outcome:
    cls: int
    latency: float  # seconds from the scheduled arrival; the give-up time when censored
    ok: bool  # answered with images
    censored: bool = False
    first_preview: float | None = None
    images: int = 0


async def send(http: httpx.AsyncClient, url: str, cls_index: int, payload: dict, arrival: float,
               give_up_s: float) -> Outcome:
    """One request; its latency counts from `arrival` (the schedule), not from when it left."""
    cls = MIX[cls_index]
    first_preview = None
    try:
        async with asyncio.timeout(max(0.0, arrival + give_up_s - time.perf_counter())):
            if cls.path.endswith("/stream"):
                ok = False
                async with http.stream("POST", url + cls.path, json=payload) as r:
                    event = None
                    async for line in r.aiter_lines():
                        if line.startswith("event:"):
                            event = line.split(":", 1)[1].strip()
                            if event == "preview" and first_preview is None:
                                first_preview = time.perf_counter() - arrival
                        elif line.startswith("data:") and event in ("result", "error"):
                            ok = event == "result" and r.status_code == 200
                            break
            else:
                r = await http.post(url + cls.path, json=payload)
                ok = r.status_code == 200
    except TimeoutError:
        return Outcome(cls_index, give_up_s, False, censored=True, first_preview=first_preview)
    except httpx.HTTPError:
        ok = False
    images = int(payload.get("num_images", 1)) if ok else 0
    return Outcome(cls_index, time.perf_counter() - arrival, ok, first_preview=first_preview, images=images)


def rung_requests(rate: float, seconds: float, least: int, most: int) -> int:
    return int(min(most, max(least, round(rate * seconds))))


async def open_loop(url: str, rate: float, n: int, give_up: list[float], image: str) -> tuple[list[Outcome], float]:
    """`n` requests at Poisson arrivals of `rate`/s (seeded by the rate: every system gets the
    same schedule and requests); returns the outcomes and the wall time to the last answer."""
    rng = np.random.default_rng(int(rate * 1000))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    classes = rng.choice(len(MIX), n, p=WEIGHTS)
    digits = rng.integers(0, 10, n)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            c = int(classes[i])
            tasks.append(asyncio.create_task(send(http, url, c, body(MIX[c], 1000 + i, int(digits[i]), image),
                                                  start + arrivals[i], give_up[c])))
        outcomes = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return list(outcomes), wall


async def standalone(url: str, repeats: int, image: str) -> list[float]:
    """Each class's median latency alone: `repeats` requests one after another, classes interleaved."""
    times: list[list[float]] = [[] for _ in MIX]
    async with httpx.AsyncClient(timeout=600) as http:
        for c, cls in enumerate(MIX):  # warm-up: every class once, untimed (sizes, schedulers, paths)
            await send(http, url, c, body(cls, 0, 0, image), time.perf_counter(), 600)
        for round_ in range(repeats):
            for c, cls in enumerate(MIX):
                out = await send(http, url, c, body(cls, 1 + round_, round_ % 10, image), time.perf_counter(), 600)
                if not out.ok:
                    raise RuntimeError(f"{url}: {cls.name} failed standing alone")
                times[c].append(out.latency)
    return [statistics.median(t) for t in times]


def engine_rows(client: httpx.Client, url: str) -> dict[str, float]:
    """The service's U-Net rows and iterations so far (its genserve_engine_batch_rows histogram)."""
    out = {"rows": 0.0, "iterations": 0.0}
    for line in client.get(f"{url}/metrics").text.splitlines():
        for key, metric in (("rows", "genserve_engine_batch_rows_sum{"),
                            ("iterations", "genserve_engine_batch_rows_count{")):
            if line.startswith(metric):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Rung:
    rate: float
    outcomes: list[Outcome]
    wall: float
    model_seconds: dict[str, float] = field(default_factory=dict)  # per model, from the service's /metrics

    def model_shares(self) -> str:
        """Share of the rung's wall time in the U-Net / text encoder / VAE (the engine's systems)."""
        if not self.model_seconds:
            return "—"
        parts = [sum(v for k, v in self.model_seconds.items() if k.endswith(suffix))
                 for suffix in ("_unet", "_text_encoder", "_vae_decoder", "_vae_encoder")]
        return " / ".join(f"{100 * p / self.wall:.0f}" for p in parts)

    def unet_rows(self) -> str:
        """Rows per U-Net call and ms per row inside the service."""
        rows, calls = self.model_seconds.get("rows", 0.0), self.model_seconds.get("iterations", 0.0)
        if not calls:
            return "— | —"
        unet = sum(v for k, v in self.model_seconds.items() if k.endswith("_unet"))
        return f"{rows / calls:.1f} | {1000 * unet / rows:.2f}"

    def share(self, slo: list[float]) -> float:
        return sum(o.ok and o.latency <= slo[o.cls] for o in self.outcomes) / len(self.outcomes)

    def row(self, slo: list[float], own_slo: list[float] | None) -> str:
        lat = [o.latency for o in self.outcomes]
        censored = any(o.censored for o in self.outcomes)
        p99 = percentile(lat, 99)
        at_least = censored and p99 >= min(o.latency for o in self.outcomes if o.censored)
        p99_text = (">" if at_least else "") + f"{p99:.2f}"
        streams = [o for o in self.outcomes if MIX[o.cls].path.endswith("/stream")]
        if all(o.first_preview is None for o in streams):  # no streams, or a system without previews
            ttfp = "—"
        else:  # a stream that never sent one counts with its latency
            ttfp = f"{percentile([o.latency if o.first_preview is None else o.first_preview for o in streams], 99):.2f}"
        images = sum(o.images for o in self.outcomes)
        errors = sum(not o.ok and not o.censored for o in self.outcomes)
        own = f" | {100 * self.share(own_slo):.1f}%" if own_slo is not None else " | —"
        return (f"| {self.rate:g} | {len(self.outcomes)} | **{100 * self.share(slo):.1f}%**{own} | "
                f"{percentile(lat, 50):.2f} | {p99_text} | {ttfp} | {images / self.wall:.2f} | {errors} | "
                f"{self.model_shares()} | {self.unet_rows()} | {self.misses(slo)} |")

    def misses(self, slo: list[float]) -> str:
        """The requests past their SLO by class of the mix (its row number: count)."""
        missed = Counter(o.cls + 1 for o in self.outcomes if not (o.ok and o.latency <= slo[o.cls]))
        return ", ".join(f"#{c}: {n}" for c, n in sorted(missed.items())) or "—"


def goodput(rungs: list[Rung], slo: list[float]) -> tuple[float, str]:
    """The highest rate with >= TARGET_SHARE within the SLO, interpolated toward the next rung
    up (which failed): (value, as written). A failure below a passing rung is taken as noise
    (MLPerf's reading: the highest rate that passes). No rung passing gives 0 ("< lowest");
    the top rung passing, that rung (">= rate")."""
    ordered = sorted(rungs, key=lambda r: r.rate)
    shares = [r.share(slo) for r in ordered]
    passing = [i for i, share in enumerate(shares) if share >= TARGET_SHARE]
    if not passing:
        return 0.0, f"< {ordered[0].rate:g}" if ordered else "n/a"
    k = passing[-1]
    if k == len(ordered) - 1:
        return ordered[k].rate, f">= {ordered[k].rate:g}"
    (r0, s0), (r1, s1) = (ordered[k].rate, shares[k]), (ordered[k + 1].rate, shares[k + 1])
    value = r0 + (r1 - r0) * (s0 - TARGET_SHARE) / (s0 - s1)
    return value, f"{value:.2f}"


# -- the outside burst -----------------------------------------------------------------------
def burst_requests(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": f"a handwritten digit {DIGITS[rng.integers(10)]}", "seed": int(seed * 100 + i),
             "num_inference_steps": int(rng.choice([10, 17, 24])), "guidance_scale": float(rng.integers(1, 6)),
             "scheduler": "ddim"} for i in range(16)]


def burst_rows(requests: list[dict]) -> int:
    return sum(r["num_inference_steps"] * (2 if r["guidance_scale"] > 1 else 1) for r in requests)


async def burst(url: str, requests: list[dict]) -> float:
    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(http.post(url + "/v1/txt2img", json=r) for r in requests))
        wall = time.perf_counter() - t0
    if any(a.status_code != 200 for a in answers):
        raise RuntimeError(f"{url}: a burst request failed: {[a.status_code for a in answers]}")
    return wall


def unet_seconds_per_row(repository: Path) -> tuple[float, float]:
    """The U-Net's cost per row (best over batch sizes, and at one row), measured here (ONNX
    Runtime): their ratio is the most that batching can save on the machine as it is now."""
    from bench.bench_engine import unet_cost
    from services.engine.cost_model import row_ladder
    from services.pipelines.pipeline_stable_diffusion import StableDiffusionPipeline, discover_stable_diffusion
    from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from services.runtime.repository import ModelRepository

    backend = OnnxRuntimeBackend(ModelRepository(repository))
    pipeline = StableDiffusionPipeline(backend, discover_stable_diffusion(backend.models())["sd_digits"])
    rows = row_ladder(backend.models()[pipeline.models.unet].max_batch_size)  # the sizes the engine times
    table = unet_cost(pipeline, rows)
    return min(table[n] / n for n in rows) / 1000, table[1] / 1000


def in_process_efficiency() -> str:
    """bench/bench_engine.py's step-level mode at 16 clients x 1 request: its efficiency while all
    clients send (its table's third column), as a subprocess (its own process, its own threads)."""
    out = Path("/tmp/genserve-goodput-engine.md")
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_engine.py"), "--clients", "16",
                           "--requests-per-client", "1", "--single", "2", "--modes", "step-level", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("| step-level |"):
            return line.split("|")[3].strip().strip("*")
    return f"failed ({proc.returncode}): {proc.stderr[-300:]}"


# -- the run ---------------------------------------------------------------------------------
@dataclass
class System:
    name: str
    url: str
    slo: list[float]
    own_slo: list[float] | None
    start_rate: float
    rungs: list[Rung] = field(default_factory=list)
    next_rung: int = 0
    start_index: int = 0  # the start rung's index in the ladder
    lowest_rate: float = 0.0  # the ladder's
    done: bool = False
    descending: bool = False  # no rung from the start up passed: the rungs below it, down to one that does

    def advance(self, rung: Rung, stop_below: float, rungs: int) -> None:
        """The next rung: up while the share stays >= `stop_below`; if none of those passed,
        down from the start until one passes (a start rung that fails says nothing of the lower ones)."""
        if self.descending:
            self.next_rung -= 1
            self.done = self.best_share(rung) >= TARGET_SHARE or self.next_rung < 0
            return
        self.next_rung += 1
        self.done = self.best_share(rung) < stop_below or self.next_rung == rungs
        start = min(r.rate for r in self.rungs)
        if self.done and all(self.best_share(r) < TARGET_SHARE for r in self.rungs) and start > self.lowest_rate:
            self.descending, self.done = True, False
            self.next_rung = self.start_index - 1

    @property
    def give_up(self) -> list[float]:
        """Per class: past GIVE_UP x the looser of its SLOs a request is a miss under both."""
        own = self.own_slo or self.slo
        return [GIVE_UP * max(a, b) for a, b in zip(self.slo, own)]

    def best_share(self, rung: Rung) -> float:
        return max(rung.share(self.slo), rung.share(self.own_slo) if self.own_slo else 0.0)


class PeerServer:
    """bench/peer_diffusers.py in its own process."""

    def __init__(self, log_path: Path, folder: Path, device: str):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "peer_diffusers.py"), "--port", str(port),
                                      "--folder", str(folder), "--device", device],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the diffusers peer exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the diffusers peer did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--rates", default="0.25,0.5,1,2,3,4,6,8,12,16,24,32", help="the ladder, requests/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="arrivals per rung: rate x this many seconds ...")
    parser.add_argument("--min-requests", type=int, default=10, help="... but at least this many ...")
    parser.add_argument("--max-requests", type=int, default=150, help="... and at most this many")
    parser.add_argument("--stop-below", type=float, default=0.8,
                        help="a system stops climbing below this share "
                             "(one noisy miss in a small rung must not stop it)")
    parser.add_argument("--calibration-repeats", type=int, default=3, help="standalone requests per class")
    parser.add_argument("--budget-s", type=float, default=600.0, help="no new round of rungs after this many seconds")
    parser.add_argument("--bursts", type=int, default=3, help="outside burst rounds (0: none)")
    parser.add_argument("--no-in-process", action="store_true", help="skip bench_engine.py's in-process figure")
    parser.add_argument("--sizes", default="32,48", help="the mix's two output sizes, px (SD 1.5: 512,768)")
    parser.add_argument("--service-env", action="append", default=[], metavar="NAME=VALUE",
                        help="for every genserve service started, e.g. GENSERVE_BACKEND=triton "
                             "GENSERVE_TRITON_URL=localhost:8001 on a GPU host (repeat the option)")
    parser.add_argument("--peer-folder", type=Path, default=ROOT / "zoo" / "checkpoints" / "sd_digits",
                        help="the diffusers folder the peer serves (the one the repository was exported from)")
    parser.add_argument("--peer-device", default="cpu", help="the peer's torch device (cuda on a GPU host)")
    parser.add_argument("--note", default="", help="written under the tables: was the machine quiet?")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "goodput.md")
    args = parser.parse_args()

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(names) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    rates = sorted(float(r) for r in args.rates.split(","))
    small, large = (int(x) for x in args.sizes.split(","))
    MIX[:] = mix(small, large)
    image = init_image(small)
    if any("=" not in item for item in args.service_env):
        parser.error("--service-env takes NAME=VALUE")
    extra_env = dict(item.split("=", 1) for item in args.service_env)
    load_before = load_average()
    began = time.monotonic()
    servers: dict[str, LocalServer | PeerServer] = {}
    try:
        for name in names:
            if name == "diffusers":
                servers[name] = PeerServer(Path("/tmp/genserve-goodput-diffusers.log"), args.peer_folder,
                                           args.peer_device)
            else:
                env = {"GENSERVE_MODEL_REPOSITORY": str(args.repository), **extra_env,
                       BENCH_POLICY_ENV: name if name in BENCH_POLICIES else "",
                       "GENSERVE_ENGINE_OVERLAP": "0" if name == "no-overlap" else "1"}
                servers[name] = LocalServer(env, Path(f"/tmp/genserve-goodput-{name}.log"))
        for server in servers.values():
            server.wait_ready()
        # Standalone latencies on the quiet services: genserve's (every engine system's: a lone
        # request runs the same code under each policy) and the peer's.
        reference = "genserve" if "genserve" in servers else next(n for n in names if n != "diffusers")
        alone = {reference: asyncio.run(standalone(servers[reference].url, args.calibration_repeats, image))}
        if "diffusers" in servers:
            alone["diffusers"] = asyncio.run(standalone(servers["diffusers"].url, args.calibration_repeats, image))
        slo = [SLO_FACTOR * t for t in alone[reference]]
        systems = []
        for name in names:
            own = alone.get(name, alone[reference])
            capacity = 1.0 / float(np.dot(WEIGHTS, own))
            start = max([r for r in rates if r <= START_FRACTION * capacity] or [rates[0]])
            systems.append(System(name, servers[name].url, slo,
                                  [SLO_FACTOR * t for t in own] if name == "diffusers" else None, start,
                                  next_rung=rates.index(start), start_index=rates.index(start),
                                  lowest_rate=rates[0]))
        # The ladder, round by round, systems interleaved in rotating order.
        round_ = 0
        while any(not s.done for s in systems) and time.monotonic() - began < args.budget_s:
            active = [s for s in systems if not s.done]
            for s in active[round_ % len(active):] + active[:round_ % len(active)]:
                rate = rates[s.next_rung]
                n = rung_requests(rate, args.seconds, args.min_requests, args.max_requests)
                with httpx.Client(timeout=30) as metrics:
                    engine = s.name in ENGINE_SYSTEMS
                    before = {**execution_seconds(metrics, s.url), **engine_rows(metrics, s.url)} if engine else {}
                    outcomes, wall = asyncio.run(open_loop(s.url, rate, n, s.give_up, image))
                    after = {**execution_seconds(metrics, s.url), **engine_rows(metrics, s.url)} if engine else {}
                rung = Rung(rate, outcomes, wall, {k: v - before.get(k, 0.0) for k, v in after.items()})
                s.rungs.append(rung)
                print(f"{s.name} @ {rate:g}/s: {100 * rung.share(s.slo):.1f}% within SLO ({n} requests)", flush=True)
                s.advance(rung, args.stop_below, len(rates))
            round_ += 1
        cut_short = [s.name for s in systems if not s.done]
        # The outside burst, per engine system, rounds interleaved; the U-Net priced around it.
        burst_walls: dict[str, list[float]] = {}
        per_row = []
        engine_systems = [s for s in systems if s.name in ENGINE_SYSTEMS]
        if args.bursts and engine_systems:
            per_row.append(unet_seconds_per_row(args.repository))
            for i in range(args.bursts):
                requests = burst_requests(i)
                for s in engine_systems:
                    burst_walls.setdefault(s.name, []).append(asyncio.run(burst(s.url, requests)))
            per_row.append(unet_seconds_per_row(args.repository))
    finally:
        for server in servers.values():
            server.stop()
    in_process = "not run" if args.no_in_process else in_process_efficiency()
    load_after = load_average()

    # -- the report --------------------------------------------------------------------------
    mix_weight = sum(c.weight for c in MIX)
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} "
             f"({platform.machine()}, {os.cpu_count()} cores)",
             "", f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
             f"Load average {load_before} before, {load_after} after. {args.note}".strip(), "",
             f"SLO = {SLO_FACTOR:g} x each request's standalone latency on genserve "
             "(nothing else sent to it, one at a time, median of "
             f"{args.calibration_repeats}); goodput = the highest rate with >= {100 * TARGET_SHARE:g}% within the SLO, "
             "interpolated between rungs.", "",
             "| system | goodput, requests/s | x genserve | start rung | rungs run |", "|---|---:|---:|---:|---|"]
    found = {s.name: goodput(s.rungs, s.slo) for s in systems}
    base = found["genserve"][0] if "genserve" in found else 0.0
    for s in systems:
        ratio = found[s.name][0] / base if base else float("nan")
        lines.append(f"| {s.name} | **{found[s.name][1]}** | {ratio:.2f} | {s.start_rate:g} | "
                     f"{', '.join(f'{r.rate:g}' for r in s.rungs)} |")
    peer = next((s for s in systems if s.own_slo is not None), None)
    if peer is not None:
        lines += ["", f"diffusers peer against 3x its own standalone latency: goodput "
                      f"**{goodput(peer.rungs, peer.own_slo)[1]}** requests/s."]
    if cut_short:
        lines += ["", f"Cut short by --budget-s before reaching their limit: {', '.join(cut_short)}."]
    lines += ["", "Per rung (latency from the scheduled arrival; '>' where a give-up bounds it; TTFP: time to the "
                  "first preview of the streams, '—' where the system sends none):", "",
              "| system | rate /s | requests | within SLO | within own 3x SLO | p50 s | p99 s | p99 TTFP s | "
              "images/s | errors | % of wall in U-Net / text encoder / VAE decoder / VAE encoder | "
              "rows / U-Net call | U-Net ms / row in the service | misses by class (# of the mix) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for s in systems:
        for rung in s.rungs:
            lines.append(f"| {s.name} " + rung.row(s.slo, s.own_slo))
    lines += ["", f"The mix (weights of {mix_weight}), standalone latency ms on genserve"
              + (" and on the diffusers peer" if "diffusers" in alone else "") + ":", "",
              "| # | class | weight | genserve ms | diffusers ms |", "|---:|---|---:|---:|---:|"]
    for c, cls in enumerate(MIX):
        other = f"{1000 * alone['diffusers'][c]:.0f}" if "diffusers" in alone else "—"
        lines.append(f"| {c + 1} | {cls.name} | {cls.weight} | {1000 * alone[reference][c]:.0f} | {other} |")
    if burst_walls:
        best = statistics.mean(b for b, _ in per_row)
        lines += ["", f"Outside burst: 16 mixed txt2img at once (10/17/24 steps, guidance 1-5, DDIM), wall time until "
                      f"the last image vs their U-Net rows at the best cost per row measured here "
                      f"({1000 * per_row[0][0]:.3f} ms before, {1000 * per_row[-1][0]:.3f} ms after the bursts; "
                      f"one row alone: {1000 * per_row[0][1]:.3f} and {1000 * per_row[-1][1]:.3f} ms, so batching "
                      f"could save at most {statistics.mean(a / b for b, a in per_row):.2f}x per row). "
                      f"In-process (bench/bench_engine.py, step-level, 16 clients, all sending): **{in_process}**.", "",
                  "| system | " + " | ".join(f"burst {i + 1}" for i in range(args.bursts)) + " |",
                  "|---|" + "---:|" * args.bursts]
        for name, walls in burst_walls.items():
            cells = [f"{burst_rows(burst_requests(i)) * best / w:.2f} ({w:.2f} s)" for i, w in enumerate(walls)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    append_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
