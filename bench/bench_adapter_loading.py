"""What the first request naming an adapter pays to load it, and what other requests' steps
feel meanwhile, over HTTP against a started service.

    PYTHONPATH=. .venv/bin/python bench/bench_adapter_loading.py [--rank 64] [--repeats 3] [--note "..."]

A temporary repository holds the demo's sd_digits text encoder, U-Net and VAE decoder with
adapter slots; an allowed directory (GENSERVE_ADAPTER_DIRS) holds, not loaded at start-up:

  stored      a random rank-`--rank` adapter on every attention / feed-forward linear of the
              U-Net, as `python -m export lora --out DIR` stores one (read with numpy)
  published   a kohya-format LoRA file written for the demo's diffusers folder
              (zoo/checkpoints/sd_digits) as trainers publish it: converted on first use by
              `python -m export lora` in a child process, then read like the stored one

While one long stream runs (its progress events timed), for each case and each repeat (under a
fresh name, so it is a first use; the conversion of a published file is cached by the file, so
every repeat copies the file to a new name): a txt2img naming the adapter (first use: load, then
generate), then the same request again (loaded); and the load alone (`POST /v1/adapters` of
another copy), with the stream's step gaps (median, max) meanwhile against before: a load must
not stall other requests' steps. Appends to
bench/results/adapter_loading.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_lora_batching import PIPELINE, slotted_copy  # noqa: E402
from bench.bench_request_breakdown import load_average  # noqa: E402
from bench.report import append_report  # noqa: E402
from export.lora import store_adapter  # noqa: E402
from tests.fixtures.local_server import LocalServer  # noqa: E402
from tests.fixtures.lora_files import random_adapter  # noqa: E402

STREAM_STEPS = 150  # the most a request may ask; the clock sends one stream after another


def build(source: Path, tmp: Path, rank: int) -> tuple[Path, Path, Path]:
    """(repository with slots, allowed directory with the stored adapter and the published file)."""
    from tests.fixtures.lora_files import write_kohya_lora

    repo, dirs = tmp / "repository", tmp / "adapters"
    targets = slotted_copy(source, repo)
    stored = store_adapter(random_adapter(targets, rank, np.random.default_rng(0)), repo, PIPELINE, "stored",
                           source="random (bench)", out=dirs)
    published = write_kohya_lora(ROOT / "zoo" / "checkpoints" / PIPELINE, tmp / "published.safetensors", rank=rank)
    return repo, stored, published


class StepClock:
    """Streams, one after another, in a thread; the times of their progress events."""

    def __init__(self, url: str):
        self.times: list[float] = []
        self.error: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        body = {"prompt": "a handwritten digit 3", "num_inference_steps": STREAM_STEPS, "seed": 1}
        with httpx.Client(timeout=600) as http:
            while not self.stop.is_set():
                with http.stream("POST", url + "/v1/txt2img/stream", json=body) as r:
                    if r.status_code != 200:
                        self.error = f"stream: {r.status_code} {r.read()[:300]!r}"
                        return
                    for line in r.iter_lines():
                        if line.startswith("event: progress"):
                            self.times.append(time.perf_counter())
                        if self.stop.is_set():
                            return

    def gaps(self, start: float, end: float) -> list[float]:
        t = [x for x in self.times if start <= x <= end]
        return [b - a for a, b in itertools.pairwise(t)]


def place(case: str, stored: Path, published: Path, dirs: Path, name: str) -> Path:
    """A copy of the stored adapter or the published file in the allowed directory, as `name`."""
    if case == "published":
        return Path(shutil.copy(published, dirs / f"{name}.safetensors"))
    shutil.copytree(stored, dirs / name)
    manifest = json.loads((dirs / name / "adapter.json").read_text())
    (dirs / name / "adapter.json").write_text(json.dumps({**manifest, "name": name}))
    return dirs / name


def txt2img(http: httpx.Client, url: str, name: str) -> float:
    t0 = time.perf_counter()
    r = http.post(url + "/v1/txt2img", json={"prompt": "a handwritten digit 7", "num_inference_steps": 10,
                                             "seed": 3, "lora": [{"name": name, "scale": 0.8}]})
    if r.status_code != 200:
        raise RuntimeError(f"{name}: {r.status_code} {r.text[:300]}")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adapter_loading.md")
    args = parser.parse_args()

    load_before, began = load_average(), time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="genserve-adapter-loading-") as name:
        tmp = Path(name)
        repo, stored, published = build(args.repository, tmp, args.rank)
        dirs = stored.parent
        megabytes = json.loads((stored / "adapter.json").read_text())["bytes"] / 1e6
        server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(repo), "GENSERVE_ADAPTER_DIRS": str(dirs),
                              "GENSERVE_ADAPTER_CACHE_DIR": str(tmp / "cache")}, tmp / "server.log")
        try:
            server.wait_ready()
            clock = StepClock(server.url)
            with httpx.Client(timeout=600) as http:
                while len(clock.times) < 20:  # the stream is running
                    if clock.error:
                        raise RuntimeError(clock.error)
                    time.sleep(0.1)
                t0 = time.perf_counter()
                time.sleep(3.0)
                baseline = clock.gaps(t0, time.perf_counter())
                for case in ("stored", "published"):
                    firsts, loaded, loads, gaps = [], [], [], []
                    for i in range(args.repeats):
                        first_use = f"{case}{i}"  # named by a request: found in the directory
                        place(case, stored, published, dirs, first_use)
                        alone = place(case, stored, published, dirs, f"{case}{i}_posted")
                        firsts.append(txt2img(http, server.url, first_use))
                        loaded.append(txt2img(http, server.url, first_use))
                        start = time.perf_counter()  # the load alone: POST /v1/adapters, no generation
                        r = http.post(server.url + "/v1/adapters", json={"path": str(alone), "model": PIPELINE})
                        loads.append(time.perf_counter() - start)
                        if r.status_code != 201:
                            raise RuntimeError(f"POST /v1/adapters: {r.status_code} {r.text[:300]}")
                        gaps += clock.gaps(start, time.perf_counter())
                    rows.append((case, statistics.median(firsts), statistics.median(loaded),
                                 statistics.median(loads), gaps))
                    print(case, rows[-1][:4], flush=True)
            clock.stop.set()
        finally:
            server.stop()

    def ms(values):
        return f"{1000 * statistics.median(values):.0f} / {1000 * max(values):.0f}" if values else "-"

    lines = [f"Adapter: rank {args.rank} on the sd_digits U-Net's attention and feed-forward linears, "
             f"{megabytes:.1f} MB as stored (fp32); the published file is kohya's layout at the same rank "
             f"(U-Net linears, a LoCon conv, the text encoder's projections). {args.repeats} first uses per case, "
             f"each under a new name. A stream of {STREAM_STEPS} steps runs throughout.", "",
             "| case | first request s | loaded request s | load alone s (POST) | stream step gap during the "
             "POST ms (median / max) |",
             "|---|---:|---:|---:|---:|",
             f"| none (before the loads) | | | | {ms(baseline)} |"]
    for case, first, warm, load, gaps in rows:
        lines.append(f"| {case} | {first:.2f} | {warm:.2f} | {load:.2f} | {ms(gaps)} |")
    import os
    import platform

    command = "PYTHONPATH=. .venv/bin/python bench/bench_adapter_loading.py " + shlex.join(sys.argv[1:])
    head = [f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, nproc {os.cpu_count()})",
            "", f"`{command.strip()}`", "",
            f"Load average {load_before} before, {load_average()} after; {time.monotonic() - began:.0f} s in all. "
            f"{args.note}", ""]
    if not args.out.exists():
        head = ["# Adapter loading on first use (bench/bench_adapter_loading.py)", "", *head]
    append_report(args.out, head + lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
