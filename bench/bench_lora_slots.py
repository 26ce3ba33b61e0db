"""What adapter slots cost the denoiser, in one run (embedded ONNX Runtime, CPU).

    PYTHONPATH=. .venv/bin/python bench/bench_lora_slots.py [--repository model_repository]
        [--pipeline sd_digits] [--rounds 7] [--calls 30] [--batch 16] [--latents 8 16]
        [--slotted PATH ...] [--cases none one mixed per-adapter]

Writes `<pipeline>_unet/1/model_lora.onnx` (export.lora.add_adapter_slots) in a temporary
folder, or times the slotted graphs given with `--slotted` (a graph with external weights must
lie beside them: the one `python -m export lora-slots` writes), and times, interleaved per round
in a shuffled order (each case the mean of `--calls` calls; "vs plain" is the median over rounds
of the case's time over plain's in the same round, so a load change between rounds cancels; the
same for the process's CPU time, which other jobs on a shared machine disturb less):

  plain           the U-Net as exported (no slots)
  no adapter      the slotted graph with S = 0: the no-adapter overhead
  1 adapter       every row the same adapter
  8 mixed         the rows over 8 different adapters (row i takes adapter i % 8) in one call
  per adapter     the same rows as one call per adapter (one adapter per batch)

at batch `--batch` and each latent side of `--latents` (default the demo's native 8 and twice
it). Adapters are random rank-`--rank` factors on every attention and feed-forward linear (what
trainers target by default), built here without torch. Appends the table, the command and the
load averages before and after to `--results` (bench/results/lora_slots.md).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.lora import add_adapter_slots, graph_targets
from services.adapters import LayerFactors, StoredAdapter, slot_inputs
from services.pipelines.controlnet import zero_residuals
from services.runtime.repository import parse_model_config, spec_from_config
from tests.fixtures.lora_files import ATTENTION

CASES = ("none", "one", "mixed", "per-adapter")  # each slotted graph's; plain is always timed


def random_adapter(name, graph, targets, rank, rng) -> StoredAdapter:
    layers = {}
    for module, t in targets.items():
        if t.kind == "linear" and module.endswith(ATTENTION):
            layers[(graph, t.node)] = LayerFactors(
                "linear", rng.standard_normal((rank, t.in_features), dtype=np.float32) * 0.1,
                rng.standard_normal((t.out_features, rank), dtype=np.float32) * 0.1)
    return StoredAdapter(name, "", {}, layers)


def main(argv=None) -> int:
    import onnxruntime as ort

    p = argparse.ArgumentParser()
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--pipeline", default="sd_digits")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--latents", type=int, nargs="+", default=[8, 16], help="latent sides timed")
    p.add_argument("--slotted", type=Path, action="append",
                   help="slotted graph(s) to time, each labelled by its file name (default: one written here)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "lora_slots.md",
                   help="the file the table is appended to")
    args = p.parse_args(argv)
    graph = f"{args.pipeline}_unet"
    plain_path = args.repository / graph / "1" / "model.onnx"
    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    plain = ort.InferenceSession(str(plain_path), opts, providers=["CPUExecutionProvider"])
    if args.slotted:
        variants = {path.name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                    for path in args.slotted}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            variants = {"slots": ort.InferenceSession(
                str(add_adapter_slots(plain_path, Path(tmp) / "model_lora.onnx")), opts,
                providers=["CPUExecutionProvider"])}
    shapes = {i.name: i.shape for i in next(iter(variants.values())).get_inputs()}
    base = {i.name: i.shape for i in plain.get_inputs()}
    spec = spec_from_config(parse_model_config((args.repository / graph / "config.pbtxt").read_text()), "1")
    targets = graph_targets(plain_path, graph)
    adapters = [random_adapter(f"a{i}", graph, targets, args.rank, rng) for i in range(8)]
    slotted_layers = len([n for n in shapes if n.startswith("lora_down:")])
    adapter_layers = len(adapters[0].layers)
    b = args.batch
    rows = []
    load_before = os.getloadavg()
    for side in args.latents:
        c, h, w = base["sample"][1], side, side
        hidden = base["encoder_hidden_states"][1:]
        feed = {"sample": rng.standard_normal((b, c, h, w), dtype=np.float32),
                "timestep": rng.uniform(0, 999, b).astype(np.float32),
                "encoder_hidden_states": rng.standard_normal((b, *hidden), dtype=np.float32),
                **zero_residuals(spec, b, h, w)}
        none = {**feed, **slot_inputs(graph, shapes, [], np.zeros((b, 0), np.float32))}
        one = {**feed, **slot_inputs(graph, shapes, adapters[:1], np.ones((b, 1), np.float32))}
        mixed_scales = np.zeros((b, 8), np.float32)
        mixed_scales[np.arange(b), np.arange(b) % 8] = 1.0
        mixed = {**feed, **slot_inputs(graph, shapes, adapters, mixed_scales)}
        per_adapter = []
        for a in range(8):
            idx = np.flatnonzero(np.arange(b) % 8 == a)
            if len(idx):
                per_adapter.append({**{k2: v[idx] for k2, v in feed.items()},
                                    **slot_inputs(graph, shapes, [adapters[a]], np.ones((len(idx), 1), np.float32))})
        cases = {"plain": lambda feed=feed: plain.run(None, feed)}
        for label, session in variants.items():
            timed = {
                "none": (f"{label}, no adapter", lambda s=session, f=none: s.run(None, f)),
                "one": (f"{label}, 1 adapter", lambda s=session, f=one: s.run(None, f)),
                "mixed": (f"{label}, 8 adapters mixed (1 call)", lambda s=session, f=mixed: s.run(None, f)),
                "per-adapter": (f"{label}, one adapter per call ({len(per_adapter)} calls)",
                                lambda s=session, fs=per_adapter: [s.run(None, f) for f in fs]),
            }
            cases.update(timed[key] for key in args.cases)
        for fn in cases.values():
            fn()
        times = {name: [] for name in cases}
        cpu = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name in rng.permutation(list(cases)):
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(args.calls):
                    cases[name]()
                times[name].append((time.perf_counter() - start) / args.calls * 1e3)
                cpu[name].append((time.process_time() - start_cpu) / args.calls * 1e3)
        for name, ts in times.items():
            med = statistics.median(ts)
            ratios = [t / ref for t, ref in zip(ts, times["plain"])]
            cpu_ratios = [t / ref for t, ref in zip(cpu[name], cpu["plain"])]
            rows.append(f"| {h}x{w} | {name} | {med:.2f} | {med / b:.3f} | {statistics.median(ratios):.3f} | "
                        f"{min(ratios):.3f}-{max(ratios):.3f} | {statistics.median(cpu_ratios):.3f} |")
    load_after = os.getloadavg()
    header = [
        f"## adapter slots, {graph}, batch {b}, rank {args.rank} "
        f"({platform.node()}, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`PYTHONPATH=. .venv/bin/python bench/bench_lora_slots.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"({slotted_layers} slotted layers; each adapter targets {adapter_layers} attention/feed-forward linears; "
        f"median of {args.rounds} interleaved rounds of {args.calls} calls; ORT 2 threads; "
        f"load average before/after {load_before[0]:.2f}/{load_after[0]:.2f} on {os.cpu_count()} cores)",
        "",
        "| latent | case | ms / call | ms / row | vs plain | rounds' range | CPU time vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    text = "\n".join([*header, *rows, ""])
    print(text)
    with args.results.open("a") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
