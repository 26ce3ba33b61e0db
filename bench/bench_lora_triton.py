"""Per-call cost of LoRA adapters on Triton: factors registered once vs sent with every call, in one run.

    PYTHONPATH=. .venv/bin/python bench/bench_lora_triton.py [--calls 40] [--adapters 1 8] [--rank 16]

A temporary repository holds the demo's sd_digits pipeline (copied from --repository) with adapter
slots (`python -m export lora-slots`: the U-Net's `model_lora.onnx` and Triton model
`sd_digits_unet_lora`) and random adapters of --rank on every attention / feed-forward linear of
the U-Net. A real Triton (deploy/triton_cpu/launch.py) serves it; the service's own TritonBackend
times one guided U-Net step (2 rows, the inputs a real request's first step sends, captured from
the pipeline) per case, the cases interleaved call by call (which goes first rotates):

  plain      no adapters: the plain model (what a call without adapters costs on Triton)
  pinned     S adapters over shared memory, the same factor arrays each call, as the engine sends
             them while a batch's adapters stay the same: written once, registered once, named
  socket     S adapters with GENSERVE_TRITON_SHARED_MEMORY=off: the factors in every gRPC message
  unpinned   S adapters over shared memory with fresh factor arrays each call: what pinning saves
             against writing and registering them per call
  embedded   the same graphs in process (ONNX Runtime), without and with the adapters: what the
             model itself costs, apart from Triton

Outputs are checked equal across pinned / socket / unpinned (bit for bit) and different from the
plain model's (the adapters act). The demo U-Net is small (its factors are KiB to a few MiB, where
SD 1.5's are ~23 MB per rank-16 adapter): the ratios here are a floor of what a real-size U-Net
saves. Appends the table, the command and the load average to bench/results/lora_triton.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import append_report  # noqa: E402
from bench.triton_server import started_triton  # noqa: E402
from export.lora import graph_targets, store_adapter  # noqa: E402
from services.adapters import load_adapter, slot_inputs  # noqa: E402
from services.pipelines.pipeline_stable_diffusion import (  # noqa: E402
    DiffusionRequest,
    StableDiffusionPipeline,
    discover_stable_diffusion,
)
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from services.runtime.repository import ModelRepository  # noqa: E402
from services.runtime.triton_backend import TritonBackend  # noqa: E402
from tests.fixtures.lora_files import random_adapter  # noqa: E402

PIPELINE = "sd_digits"
UNET = f"{PIPELINE}_unet"
PARTS = ("text_encoder", "unet", "vae_decoder")


def build_repository(source: Path, folder: Path, rank: int, count: int) -> list:
    """The pipeline with adapter slots and `count` random adapters; returns them as loaded."""
    for part in PARTS:
        shutil.copytree(source / f"{PIPELINE}_{part}", folder / f"{PIPELINE}_{part}",
                        ignore=shutil.ignore_patterns("adapters", "model_lora.onnx", "*_lora"))
    subprocess.run([sys.executable, "-m", "export", "lora-slots", "--pipeline", PIPELINE, "--repository", str(folder)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    targets = graph_targets(folder / UNET / "1" / "model.onnx", UNET)
    rng = np.random.default_rng(0)
    return [load_adapter(store_adapter(random_adapter(targets, rank, rng), folder, PIPELINE, f"a{i}",
                                       source="random (bench)")) for i in range(count)]


async def first_step_inputs(repository: Path) -> dict[str, np.ndarray]:
    """The U-Net inputs of a guided request's first step (2 rows), as the pipeline sends them."""
    backend = OnnxRuntimeBackend(ModelRepository(repository))
    seen: dict[str, np.ndarray] = {}
    infer = backend.infer

    async def capture(model, inputs, outputs=None):
        if model == UNET and not seen:
            seen.update({k: v.copy() for k, v in inputs.items()})
        return await infer(model, inputs, outputs)

    backend.infer = capture  # type: ignore[method-assign]
    pipeline = StableDiffusionPipeline(backend, discover_stable_diffusion(backend.models())[PIPELINE])
    await pipeline(DiffusionRequest(prompt="7", num_inference_steps=1, guidance_scale=5.0, seed=1))
    return seen


async def measure(url: str, repository: Path, adapters: list, counts: list[int], calls: int) -> list[dict]:
    specs = ModelRepository(repository)
    shm = TritonBackend(specs, url, shared_memory="required")
    socket = TritonBackend(specs, url, shared_memory="off")
    embedded = OnnxRuntimeBackend(specs)  # the same graphs in process: the model's own cost
    x = await first_step_inputs(repository)
    rows = len(x["sample"])
    shapes = shm.adapter_slots(UNET)
    assert shapes is not None, "no slotted U-Net in the repository"
    results = []
    try:
        plain = (await shm.infer(UNET, x))["noise_pred"]
        for count in counts:
            slots = slot_inputs(UNET, shapes, adapters[:count], np.full((rows, count), 0.8, np.float32))
            factor_bytes = sum(v.nbytes for k, v in slots.items() if k != "lora_scale")

            same = {**x, **slots}  # the engine's calls: the same factor arrays while the adapters stay

            def fresh(slots=slots):
                return {**x, **{k: v.copy() for k, v in slots.items()}}

            cases = {"plain": (shm, lambda: x), "pinned": (shm, lambda s=same: s), "socket": (socket, lambda s=same: s),
                     "unpinned": (shm, fresh), "embedded_plain": (embedded, lambda: x),
                     "embedded": (embedded, lambda s=same: s)}
            outs = {name: (await backend.infer(UNET, make()))["noise_pred"] for name, (backend, make) in cases.items()}
            assert np.array_equal(outs["pinned"], outs["socket"]) and np.array_equal(outs["pinned"], outs["unpinned"])
            assert np.allclose(outs["pinned"], outs["embedded"], atol=1e-5)
            assert not np.allclose(outs["pinned"], plain), "the adapters did not change the U-Net's output"
            times: dict[str, list[float]] = {name: [] for name in cases}
            order = list(cases)
            for i in range(calls):
                for name in order[i % len(order):] + order[:i % len(order)]:
                    backend, make = cases[name]
                    inputs = make()
                    t0 = time.perf_counter()
                    await backend.infer(UNET, inputs)
                    times[name].append(time.perf_counter() - t0)
            before = shm.shared_memory_status()["adapter_factor_registrations"]
            results.append({"adapters": count, "factor_mib": factor_bytes / 2**20,
                            **{name: statistics.median(t) * 1000 for name, t in times.items()}})
            print(results[-1], before, flush=True)
        status = shm.shared_memory_status()
        assert status["transport"] == "shared_memory" and status["socket_calls"] == 0, status
    finally:
        await shm.close()
        await socket.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=40, help="timed calls per case")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8], help="adapters in the call (S)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_triton.md")
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())

    work = Path(tempfile.mkdtemp(prefix="genserve-lora-triton-"))
    repository = work / "repository"
    adapters = build_repository(args.repository, repository, args.rank, max(args.adapters))
    try:
        with started_triton(repository, work) as url:
            results = asyncio.run(measure(url, repository, adapters, args.adapters, args.calls))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after = " ".join(f"{x:.2f}" for x in os.getloadavg())

    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, "
             f"{os.cpu_count()} cores, load average {load} before, {after} after)", "",
             f"`{' '.join([Path(sys.executable).name, *sys.argv])}` (rank {args.rank}, 2 rows per call)", "",
             "| adapters in the call | factor MiB per call | plain ms | pinned ms | socket ms | unpinned ms | "
             "embedded plain / adapters ms | pinned / plain | embedded adapters / plain | socket / pinned | "
             "unpinned / pinned |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['adapters']} | {r['factor_mib']:.2f} | {r['plain']:.2f} | {r['pinned']:.2f} | "
                     f"{r['socket']:.2f} | {r['unpinned']:.2f} | {r['embedded_plain']:.2f} / {r['embedded']:.2f} | "
                     f"{r['pinned'] / r['plain']:.2f} | {r['embedded'] / r['embedded_plain']:.2f} | "
                     f"{r['socket'] / r['pinned']:.2f} | {r['unpinned'] / r['pinned']:.2f} |")
    append_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
