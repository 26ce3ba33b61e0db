"""Multi-LoRA batching over HTTP: one U-Net call for every adapter (genserve) against one
adapter combination per batch (vLLM-Omni's and SGLang's step modes), in one run.

    PYTHONPATH=. .venv/bin/python bench/bench_lora_batching.py [--rounds 15] [--steps 20]
        [--with-adapter 13] [--guidance 5] [--note "..."]

A temporary repository holds the demo's sd_digits text encoder, U-Net and VAE decoder (copied
from --repository), their adapter slots (`python -m export lora-slots`) and 8 random rank-8
adapters on the U-Net's attention and feed-forward linears, stored as `python -m export lora`
stores a published file (export.lora.store_adapter). Two services run on it side by side:

  genserve   the engine as deployed: rows with any adapters (and none) share a U-Net call
  matching   GENSERVE_BENCH_POLICY=matching: step batching only across requests with the same
             adapters at the same scales (services/engine/bench_policies.py)

Each round sends one burst of 16 concurrent /v1/txt2img requests to each service (which goes
first alternates by round, so a drift of the shared machine lands on both): --with-adapter of
them name one of the 8 adapters at scale 0.8, the rest none; seeds are fixed per round and
request, and steps, guidance, scheduler and size are the same for all, so the adapter set is
the only key that tells requests apart. Per system, the median over rounds of the wall time
until the burst's last image, images/s from it, and from the service's /metrics the U-Net calls
and rows per call of a burst and the U-Net's ms per row. Every request's image must be the
same pixels from both services (same seed and adapter -> same image: the engine is
batch-invariant); the run says whether they are, and that an adapter does change the image.

Appends the table, the command, `nproc` and the load average before and after to
bench/results/lora_batching.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_goodput import DIGITS, engine_rows  # noqa: E402
from bench.bench_request_breakdown import execution_seconds, load_average  # noqa: E402
from bench.report import append_report  # noqa: E402
from export.lora import graph_targets, store_adapter  # noqa: E402
from services.engine.bench_policies import BENCH_POLICY_ENV  # noqa: E402
from tests.fixtures.local_server import LocalServer  # noqa: E402
from tests.fixtures.lora_files import random_adapter  # noqa: E402

PIPELINE = "sd_digits"
PARTS = ("text_encoder", "unet", "vae_decoder")  # what txt2img runs
ADAPTERS = 8
CONCURRENCY = 16
SCALE = 0.8
SYSTEMS = {"genserve": "", "matching": "matching"}  # name -> GENSERVE_BENCH_POLICY


def slotted_copy(source: Path, folder: Path) -> dict:
    """The pipeline's parts copied from `source` with adapter slots; the U-Net's LoRA targets."""
    for part in PARTS:
        shutil.copytree(source / f"{PIPELINE}_{part}", folder / f"{PIPELINE}_{part}",
                        ignore=shutil.ignore_patterns("adapters", "model_lora.onnx", "*_lora"))
    subprocess.run([sys.executable, "-m", "export", "lora-slots", "--pipeline", PIPELINE, "--repository", str(folder)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    unet = f"{PIPELINE}_unet"
    return graph_targets(folder / unet / "1" / "model.onnx", unet)


def build_repository(source: Path, folder: Path, rank: int) -> list[str]:
    """The pipeline's parts with adapter slots and ADAPTERS stored adapters; returns their names."""
    targets = slotted_copy(source, folder)
    rng = np.random.default_rng(0)
    names = [f"style{i}" for i in range(ADAPTERS)]
    for name in names:
        store_adapter(random_adapter(targets, rank, rng), folder, PIPELINE, name, source="random (bench)")
    return names


def burst_requests(round_: int, adapters: list[str], with_adapter: int, steps: int, guidance: float) -> list[dict]:
    """The round's 16 requests: the first `with_adapter` cycle through the adapters, the rest
    have none; shuffled (the same way every round) so arrivals mix adapter sets."""
    out = []
    for i in range(CONCURRENCY):
        body = {"prompt": f"a handwritten digit {DIGITS[i % 10]}", "seed": 1000 * round_ + i,
                "num_inference_steps": steps, "guidance_scale": guidance, "scheduler": "ddim"}
        if i < with_adapter:
            body["lora"] = [{"name": adapters[i % len(adapters)], "scale": SCALE}]
        out.append(body)
    order = np.random.default_rng(1).permutation(CONCURRENCY)
    return [out[i] for i in order]


def pixels(answer: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]["data"]))))


async def burst(url: str, requests: list[dict]) -> tuple[float, list[np.ndarray]]:
    """The wall time until the last of `requests` (sent at once) is answered, and their images."""
    async with httpx.AsyncClient(timeout=600) as http:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(http.post(url + "/v1/txt2img", json=r) for r in requests))
        wall = time.perf_counter() - t0
    failed = [a.text[:300] for a in answers if a.status_code != 200]
    if failed:
        raise RuntimeError(f"{url}: {len(failed)} burst requests failed, e.g. {failed[0]}")
    return wall, [pixels(a.json()) for a in answers]


def measured_burst(url: str, requests: list[dict]) -> dict:
    """One burst with the service's U-Net calls, rows and seconds over it (/metrics before and after)."""
    with httpx.Client(timeout=30) as metrics:
        before = {**engine_rows(metrics, url), **execution_seconds(metrics, url)}
        wall, images = asyncio.run(burst(url, requests))
        after = {**engine_rows(metrics, url), **execution_seconds(metrics, url)}
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {"wall": wall, "images": images, "calls": delta["iterations"], "rows": delta["rows"],
            "unet_s": delta.get(f"{PIPELINE}_unet", 0.0)}


def adapter_changes_image(url: str, requests: list[dict]) -> float:
    """Mean absolute pixel difference between a request with an adapter and the same request
    without it (0 would mean the adapters are not applied and the comparison is empty)."""
    with_lora = next(r for r in requests if r.get("lora"))
    plain = {k: v for k, v in with_lora.items() if k != "lora"}
    _, (a, b) = asyncio.run(burst(url, [with_lora, plain]))
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                        help=f"where the built demo's {PIPELINE} parts are copied from")
    parser.add_argument("--rounds", type=int, default=15, help="timed bursts per system (after one warm-up)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0, help="> 1: two U-Net rows per image")
    parser.add_argument("--with-adapter", type=int, default=13,
                        help=f"requests of the {CONCURRENCY} that name an adapter (the rest: none)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--note", default="", help="written under the table: was the machine quiet?")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_batching.md")
    args = parser.parse_args()
    if not 1 <= args.with_adapter <= CONCURRENCY:
        parser.error(f"--with-adapter must be 1..{CONCURRENCY}")

    load_before = load_average()
    began = time.monotonic()
    results: dict[str, list[dict]] = {name: [] for name in SYSTEMS}
    with tempfile.TemporaryDirectory(prefix="genserve-lora-batching-") as tmp:
        adapters = build_repository(args.repository, Path(tmp), args.rank)
        servers = {}
        try:
            for name, policy in SYSTEMS.items():  # one at a time: each times its U-Net at start-up
                servers[name] = LocalServer({"GENSERVE_MODEL_REPOSITORY": tmp, BENCH_POLICY_ENV: policy},
                                            Path(f"/tmp/genserve-lora-batching-{name}.log"))
                servers[name].wait_ready()
            warm = burst_requests(0, adapters, args.with_adapter, args.steps, args.guidance)
            for server in servers.values():
                asyncio.run(burst(server.url, warm))
            change = adapter_changes_image(servers["genserve"].url, warm)
            for round_ in range(1, args.rounds + 1):
                requests = burst_requests(round_, adapters, args.with_adapter, args.steps, args.guidance)
                names = list(SYSTEMS) if round_ % 2 else list(SYSTEMS)[::-1]
                for name in names:
                    results[name].append(measured_burst(servers[name].url, requests))
                walls = ", ".join(f"{n} {results[n][-1]['wall']:.2f} s" for n in SYSTEMS)
                print(f"round {round_}: {walls}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    load_after = load_average()

    # Batch invariance: request i of round r, the same pixels from both services.
    pairs = [(a, b) for ra, rb in zip(results["genserve"], results["matching"])
             for a, b in zip(ra["images"], rb["images"])]
    equal = sum(np.array_equal(a, b) for a, b in pairs)
    worst = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) for a, b in pairs)
    print(f"images equal between the policies: {equal}/{len(pairs)} (largest pixel difference {worst})")

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    sets = len({str(r.get("lora")) for r in burst_requests(1, adapters, args.with_adapter, args.steps, args.guidance)})
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} "
             f"({platform.machine()}, nproc {len(os.sched_getaffinity(0))})", "",
             f"`PYTHONPATH=. {shlex.join([Path(sys.executable).name, *sys.argv])}`", "",
             f"Load average {load_before} before, {load_after} after; "
             f"{time.monotonic() - began:.0f} s in all. {args.note}".strip(), "",
             f"{CONCURRENCY} concurrent /v1/txt2img per burst: {args.with_adapter} with one of {ADAPTERS} random "
             f"rank-{args.rank} adapters at scale {SCALE} (U-Net attention and feed-forward linears), "
             f"{CONCURRENCY - args.with_adapter} with none ({sets} adapter sets); {args.steps} steps, "
             f"guidance {args.guidance:g}, DDIM, 32 px. Median of {args.rounds} rounds (one warm-up), the systems' "
             f"order alternating by round.", "",
             "| system | images/s | x matching | wall / burst s | U-Net calls / burst | rows / call | "
             "U-Net ms / row |", "|---|---:|---:|---:|---:|---:|---:|"]
    base = CONCURRENCY / median("matching", "wall")
    for name in SYSTEMS:
        wall, calls = median(name, "wall"), median(name, "calls")
        rows = sum(r["rows"] for r in results[name]) / sum(r["calls"] for r in results[name])
        per_row = statistics.median(1000 * r["unet_s"] / r["rows"] for r in results[name])
        lines.append(f"| {name} | **{CONCURRENCY / wall:.2f}** | {CONCURRENCY / wall / base:.2f} | {wall:.2f} | "
                     f"{calls:.0f} | {rows:.1f} | {per_row:.3f} |")
    paired = statistics.median(m["wall"] / g["wall"] for g, m in zip(results["genserve"], results["matching"]))
    lines += ["", f"Per round, matching's wall / genserve's (the same requests, back to back): median "
                  f"**{paired:.2f}x**.",
              "", "Walls per round (s): " + "; ".join(
                  f"{name} " + ", ".join(f"{r['wall']:.2f}" for r in results[name]) for name in SYSTEMS),
              "", f"Same image per request under both policies (same seed and adapter): **{equal}/{len(pairs)}** "
                  f"equal, largest pixel difference {worst}. An adapter changes the image by {change:.1f} "
                  f"(mean absolute pixel difference against the same request without it)."]
    append_report(args.out, lines)
    return 0 if equal == len(pairs) else 1


if __name__ == "__main__":
    sys.exit(main())
