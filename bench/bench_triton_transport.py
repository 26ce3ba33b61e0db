"""What shared memory saves per Triton call, by tensor size: the socket vs /dev/shm, in one run.

    .venv/bin/python bench/bench_triton_transport.py --calls 100

The demo U-Net's tensors are a few KiB, too small for the transport to show. This builds a
throw-away repository with the demo U-Net (model_repository/sd_digits_unet, linked) beside
pass-through denoisers at real latent and text-embedding sizes
(SD 1.5: 64x64 latents, 77x768 text; SDXL: 128x128 latents, 77x2048 text), starts a real
Triton on it (deploy/triton_cpu/launch.py), and times the service's own TritonBackend on
the same inputs with GENSERVE_TRITON_SHARED_MEMORY=off and =required, calls interleaved
so that both see the same machine (alternating which goes first). Outputs are checked equal
(bit for bit) across the two.
The graph only copies `sample` to `noise_pred`: what is timed is the transport, Triton's
request handling and, on this CPU server, the Python backend's own copy to its stub
(a native backend on the NGC image does not have that copy). Appends the table, with the
command, to bench/results/triton_transport.md.
"""

from __future__ import annotations

import argparse
import asyncio
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
from bench.triton_server import started_triton  # noqa: E402
from services.runtime.repository import ModelRepository  # noqa: E402
from services.runtime.triton_backend import TritonBackend  # noqa: E402

# name -> (latent channels, latent side, text tokens, text width)
MODELS = {"sd_digits_unet": (4, 8, 16, 64),  # the demo U-Net itself (a real graph)
          "passthrough_sd15": (4, 64, 77, 768), "passthrough_sdxl": (4, 128, 77, 2048)}
DEMO = ROOT / "model_repository" / "sd_digits_unet"
CONFIG = """name: "{name}"
backend: "onnxruntime"
max_batch_size: 16
input [
  {{ name: "sample" data_type: TYPE_FP32 dims: [ {c}, {side}, {side} ] }},
  {{ name: "timestep" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "encoder_hidden_states" data_type: TYPE_FP32 dims: [ {tokens}, {width} ] }}
]
output [ {{ name: "noise_pred" data_type: TYPE_FP32 dims: [ {c}, {side}, {side} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def build_repository(root: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    (root / DEMO.name).parent.mkdir(parents=True, exist_ok=True)
    (root / DEMO.name).symlink_to(DEMO.resolve(), target_is_directory=True)
    for name, (c, side, tokens, width) in MODELS.items():
        if name == DEMO.name:
            continue
        graph = helper.make_graph(
            [helper.make_node("Identity", ["sample"], ["noise_pred"])], name,
            [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", c, side, side]),
             helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch", 1]),
             helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", tokens, width])],
            [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", c, side, side])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name, c=c, side=side, tokens=tokens, width=width))


def inputs(name: str, rows: int, seed: int) -> dict[str, np.ndarray]:
    c, side, tokens, width = MODELS[name]
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((rows, c, side, side), dtype=np.float32),
            "timestep": np.full((rows, 1), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((rows, tokens, width), dtype=np.float32)}


async def measure(url: str, repository: Path, rows_list: list[int], calls: int, models: list[str]) -> list[dict]:
    from services.pipelines.controlnet import zero_residuals

    specs = ModelRepository(repository)
    backends = {"socket": TritonBackend(specs, url, shared_memory="off"),
                "shm": TritonBackend(specs, url, shared_memory="required")}
    results = []
    try:
        for name in models:
            for rows in rows_list:
                x = inputs(name, rows, seed=rows)
                x.update(zero_residuals(specs[name], rows, *x["sample"].shape[2:]))  # the demo's ControlNet inputs
                outs = {k: await b.infer(name, x) for k, b in backends.items()}  # warm-up, learns shapes
                assert np.array_equal(outs["socket"]["noise_pred"], outs["shm"]["noise_pred"])
                if name != DEMO.name:  # the pass-through graphs return their input
                    assert np.array_equal(outs["shm"]["noise_pred"], x["sample"])
                times = {k: [] for k in backends}
                for i in range(calls):  # alternating which goes first
                    for k, b in (list(backends.items()) if i % 2 == 0 else list(backends.items())[::-1]):
                        t0 = time.perf_counter()
                        await b.infer(name, x)
                        times[k].append(time.perf_counter() - t0)
                mib = sum(v.nbytes for v in x.values()) + x["sample"].nbytes
                results.append({"model": name, "rows": rows, "mib": mib / 2**20,
                                **{k: statistics.median(v) * 1000 for k, v in times.items()}})
                print(results[-1], flush=True)
        status = backends["shm"].shared_memory_status()
        assert status["socket_calls"] == 0 and status["transport"] == "shared_memory", status
    finally:
        for b in backends.values():
            await b.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="timed calls per transport, size and batch")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 16])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "triton_transport.md")
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())

    work = Path(tempfile.mkdtemp(prefix="genserve-transport-"))
    repository = work / "repository"
    build_repository(repository)
    with started_triton(repository, work) as url:
        results = asyncio.run(measure(url, repository, args.rows, args.calls, args.models))

    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()}, "
             f"{os.cpu_count()} cores, load average {load})", "",
             f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
             "| model | rows | KiB per call (in + out) | socket ms | shm ms | socket / shm |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['rows']} | {r['mib'] * 1024:,.0f} | {r['socket']:.2f} | {r['shm']:.2f} | "
                     f"{r['socket'] / r['shm']:.2f} |")
    append_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
