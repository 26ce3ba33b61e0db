"""How long Python's full garbage collection holds the GIL in a worker, before and after the
start-up heap is frozen (services.memory.freeze_startup_heap).

    .venv/bin/python bench/bench_gc_pause.py [--repository model_repository]

Builds what a worker builds at start-up (the service's modules, the backend with every model of
the repository, the diffusion pipelines), then times gc.collect() five times, freezes the heap
as the worker does after warm-up, and times it five times again. Appends to
bench/results/gc_pause.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gc_pause.md")
    args = parser.parse_args()
    os.environ["GENSERVE_MODEL_REPOSITORY"] = str(args.repository)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="genserve-gc-"))

    import services.service  # noqa: F401  (what the worker imports)
    from bench.bench_request_breakdown import load_average
    from bench.report import append_report
    from services.config import Settings
    from services.memory import freeze_startup_heap
    from services.metrics import service_metrics
    from services.pipelines import diffusion_pipelines
    from services.runtime import create_backend

    settings = Settings.from_env()
    backend = create_backend(settings, service_metrics())
    pipelines = diffusion_pipelines(backend, settings)

    def timed() -> list[float]:
        out = []
        for _ in range(5):
            t0 = time.perf_counter()
            gc.collect()
            out.append(1000 * (time.perf_counter() - t0))
        return out

    tracked = len(gc.get_objects())
    before = timed()
    frozen = freeze_startup_heap()
    after = timed()
    append_report(args.out, [
        f"## {time.strftime('%Y-%m-%d %H:%M')}, load average {load_average()}", "",
        f"`python bench/bench_gc_pause.py --repository {args.repository}`", "",
        f"{tracked} objects tracked after start-up ({len(pipelines)} diffusion pipelines, "
        f"{len(backend.models())} models); {frozen} frozen.", "",
        "| heap | full collection, ms (5 runs) |", "|---|---|",
        f"| as built | {', '.join(f'{t:.1f}' for t in before)} |",
        f"| start-up heap frozen | {', '.join(f'{t:.1f}' for t in after)} |"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
