"""The step engine's own cost per iteration: everything but the model, with a zero-cost U-Net.

    .venv/bin/python bench/bench_engine_overhead.py [TREE] [--policy fair|fcfs] [--inline] [--loop [--device-ms MS]]

The U-Net's ONNX Runtime session is replaced by one that returns zeros at once, so each
iteration's time is the engine's scheduling, input building, the backend call path (the
worker-thread hand-off included), guidance and scheduler steps, bookkeeping and metrics
hooks. The workload is bench_engine.py's (16 clients x 4 requests, steps 10-30), all
submitted at once and their prompts encoded before the clock starts. TREE (default: this
checkout) is the source tree to import the engine from, so an older commit's engine can be
timed with the same script (`git worktree add /tmp/old <commit>`). Prints iterations and
ms per iteration (median and mean); nothing is written: copy the lines into
bench/results/engine.md with the machine's load. `--loop`: the engine's background loop runs
instead of `step()` called by hand, overlapped and not (engines that have both), and the
figure is its wall time per iteration. `--device-ms MS`: each U-Net call takes MS in its worker
thread without using a core (a sleep, as a GPU call leaves the CPU free); the figure is then the
wall per iteration less MS, what the loop adds to each call on a device's critical path.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", nargs="?", type=Path, default=ROOT)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--policy", choices=("fair", "fcfs"), help="the engine's order (engines that have one)")
    parser.add_argument("--inline", action="store_true", help="U-Net calls on the event loop's thread")
    parser.add_argument("--loop", action="store_true", help="the background loop, overlapped and not")
    parser.add_argument("--device-ms", type=float, default=0.0, help="with --loop: each U-Net call sleeps this long")
    args = parser.parse_args()
    sys.path[:0] = [str(args.tree), str(args.tree / "bench"), str(ROOT / "bench")]

    import numpy as np
    from bench_engine import workload

    from services.engine.engine import DiffusionEngine
    from services.pipelines.pipeline_stable_diffusion import StableDiffusionPipeline, discover_stable_diffusion
    from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from services.runtime.repository import ModelRepository

    backend = OnnxRuntimeBackend(ModelRepository(args.repository))
    models = discover_stable_diffusion(backend.models())["sd_digits"]
    pipeline = StableDiffusionPipeline(backend, models)

    class Zero:
        def run(self, names, feeds, *run_options):
            if args.device_ms:
                time.sleep(args.device_ms / 1000)
            return [np.zeros_like(feeds["sample"])]

    backend._sessions[models.unet] = Zero()
    jobs = [r for client in workload(16, 4, "a handwritten digit {digit}") for r in client]

    async def run():
        policy = {"policy": args.policy} if args.policy else {}
        try:
            from services.engine.engine import EngineConfig
        except ImportError:  # an older tree's engine: it took its bounds as arguments
            engine = DiffusionEngine(pipeline, 16, 10**9, start_loop=False, **policy)
        else:
            engine = DiffusionEngine(pipeline, EngineConfig(16, 10**9, **policy), start_loop=False)
        if args.inline:
            backend.inline_max_s = 1.0
            feeds = {"sample": np.zeros((1, 4, 8, 8), np.float32), "timestep": np.ones((1, 1), np.float32),
                     "encoder_hidden_states": np.zeros((1, 16, 64), np.float32)}
            await backend.infer(models.unet, feeds)  # measured once: later calls go inline
        handles = [engine.submit(r, 3600) for r in jobs]
        await engine._admit()  # prompts encoded before the clock starts
        per = []
        while not all(h.status.finished for h in handles):
            t0 = time.perf_counter()
            await engine.step()
            per.append(time.perf_counter() - t0)
        return engine.iterations, per

    async def loop(overlap: bool):
        from services.engine.engine import EngineConfig
        policy = {"policy": args.policy} if args.policy else {}
        engine = DiffusionEngine(pipeline, EngineConfig(16, 10**9, overlap=overlap, **policy), start_loop=False)
        handles = [engine.submit(r, 3600) for r in jobs]
        await engine._admit()
        engine._start_loop = True
        t0 = time.perf_counter()
        engine._ensure_running()
        await asyncio.gather(*(h.done.wait() for h in handles))
        wall = time.perf_counter() - t0
        await engine.close()
        return engine.iterations, wall

    if args.loop:
        for overlap in (False, True, False, True):
            iterations, wall = asyncio.run(loop(overlap))
            per = 1000 * wall / iterations
            print(f"{args.tree} loop overlap={overlap} policy={args.policy or 'default'} device_ms={args.device_ms:g}: "
                  f"iterations {iterations}, ms per iteration {per:.3f}, less the device's {per - args.device_ms:.3f}")
        return 0
    iterations, per = asyncio.run(run())
    print(f"{args.tree} policy={args.policy or 'default'} inline={args.inline}: iterations {iterations}, "
          f"ms per iteration median {1000 * statistics.median(per):.3f} mean {1000 * statistics.mean(per):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
