"""Embedded backend: ONNX Runtime sessions in this process, read from the repository.

Sessions are opened once at start-up. `session.run` releases the GIL, so calls run in
worker threads and the event loop stays free for other requests. Some calls run on the
event loop's own thread instead, sparing the hand-off to a worker and back (two thread
wake-ups: 0.1-0.3 ms per call measured on 2 cores, against a 2-row demo U-Net call of
~1.5 ms), when the model's measured seconds per row times the call's rows is at most
  - `inline_max_s` (GENSERVE_ORT_INLINE_MS; 0, the default: never), for every call: it
    helped the step engine in process, but over HTTP under mixed load it blocked the loop's
    other work (parsing, PNG encoding) that a worker-thread call overlaps, and cost throughput;
  - `alone_inline_max_s` (GENSERVE_ORT_ALONE_INLINE_MS, default 20; 0: never), for calls
    made under `latency_first()` while no other call of this backend is in flight: the step
    engine serving a single request, where there is nothing else to overlap. The engine
    yields between a step's stages, so a request arriving meanwhile waits at most one
    stage's calls to be read (the text encoder; a U-Net step and its preview's decode; the
    final decode).
The measured time is kept per model and per row shape: a request at another size is not
priced at the native size, and a shape's first call always runs in a worker.

A model with a slotted graph beside its own (`model_lora.onnx`, `python -m export lora-slots`)
is served by that graph alone, for calls with adapters and without (empty slots: one small If
per layer, measured in bench/results/lora_slots.md), rather than by two sessions holding the
weights twice. A row without adapters gets exactly its base layer's output either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from services.adapters import SCALE_INPUT, SLOTTED_GRAPH, is_slot_input, slot_inputs
from services.engine.memory import ACTIVATION_BYTES_PARAMETER
from services.runtime.base import InferenceBackend, graph_shaped, latency_first_requested
from services.runtime.repository import ModelRepository, ModelSpec

log = logging.getLogger("genserve.onnxruntime")

# Under latency_first(), calls expected to take at most this long run on the calling thread.
INLINE_ALONE_MAX_S = 0.02


_shared_pools: tuple[int, int] | None = None  # (intra, inter) of the process-wide pools, once made


def use_shared_thread_pools(intra_op_threads: int, inter_op_threads: int) -> None:
    """Creates ONNX Runtime's process-wide thread pools (once per process: ONNX Runtime cannot
    replace them). A second backend asking for other sizes gets the first one's, logged."""
    global _shared_pools
    if _shared_pools is None:  # ONNX Runtime's Python API has the global pools only here
        ort.capi._pybind_state.set_global_thread_pool_sizes(intra_op_threads, inter_op_threads)
        _shared_pools = (intra_op_threads, inter_op_threads)
    elif _shared_pools != (intra_op_threads, inter_op_threads):
        log.warning("ONNX Runtime's shared thread pools exist with (intra, inter) = %s threads; "
                    "%s asked for now is ignored", _shared_pools, (intra_op_threads, inter_op_threads))


# A graph whose activations reach this per batch row gives its arena back after each call.
ARENA_MAX_ROW_BYTES = 256 << 20


def releases_activations(spec: ModelSpec) -> bool:
    """Image-to-image graphs run without ONNX Runtime's memory arena: their activations grow
    with the tile (hundreds of MB a row), and the arena keeps its peak for the life of the
    process (+1.5 GB held after one 512x512 x4 upscale). Without it they are freed after
    each call."""
    return spec.parameters.get("genserve.pipeline") == "image_to_image"


def shrinks_arena(spec: ModelSpec) -> bool:
    """Graphs whose export recorded more than ARENA_MAX_ROW_BYTES of activations per row (a
    real-size U-Net or VAE) keep the arena during a call but shrink it after each one: an SD
    2.1-size service held 19.5 GiB after one 768x768 request (9.0 GiB before it), an SD 1.5-size
    one 10.1 GiB (7.0). Running them without the arena instead gave the memory back too, but
    made a 512x512 SD 1.5 U-Net call 1.5-1.9x slower on this CPU: every intermediate buffer
    was then fresh pages, where a shrunk arena refills a few large regions per call."""
    if releases_activations(spec):
        return False
    return float(spec.parameters.get(ACTIVATION_BYTES_PARAMETER, 0) or 0) >= ARENA_MAX_ROW_BYTES


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"
    computes_on_worker_cores = True  # the CPU execution provider, in this process

    def __init__(self, repository: ModelRepository, intra_op_threads: int = 0, inter_op_threads: int = 0,
                 inline_max_s: float = 0.0, allow_spinning: bool = True, shared_threads: bool = False,
                 alone_inline_max_s: float = INLINE_ALONE_MAX_S):
        """`shared_threads`: every session runs on ONNX Runtime's process-wide pool (the thread
        counts size it) instead of a pool of its own. Per-session pools are a spinning thread
        per recently used model: a text-encoder or VAE call leaves its pool spinning through
        the U-Net calls that follow, on the cores they need (measured on 2 cores: the shared
        pool gave the step engine 1.15-1.47x the images/s at 16 clients; bench/README.md).
        The service turns it on (GENSERVE_ORT_THREAD_POOL); it is off by default here because
        it is process-wide: once it exists, ONNX Runtime opens no session with a pool of its
        own in the process, anyone's `ort.InferenceSession(path)` included. `allow_spinning=
        False`: pool threads sleep between calls; per-session pools only (the shared pool
        always spins). `inline_max_s`, `alone_inline_max_s`: which calls run on the calling
        thread (the module's docstring)."""
        super().__init__()
        if shared_threads and not allow_spinning:
            raise ValueError("ONNX Runtime's shared thread pools always spin: sleeping pool threads "
                             "(allow_spinning=False) need per-session pools (shared_threads=False)")
        if not shared_threads and _shared_pools is not None:
            raise ValueError("this process already runs ONNX Runtime's shared thread pool, and ONNX Runtime "
                             "opens no session with a pool of its own after that: the choice is per process")
        self.repository = repository
        self.inline_max_s = inline_max_s
        self.alone_inline_max_s = alone_inline_max_s
        # Moving average of session.run's own time per row, by (model, a row's input shape).
        self._seconds_per_row: dict[tuple, float] = {}
        self._in_flight = 0  # calls of this backend running now (in workers or inline)
        if shared_threads:
            use_shared_thread_pools(intra_op_threads, inter_op_threads)

        def options(arena: bool) -> ort.SessionOptions:
            o = ort.SessionOptions()
            o.use_per_session_threads = not shared_threads
            o.intra_op_num_threads = intra_op_threads
            o.inter_op_num_threads = inter_op_threads
            spin = "1" if allow_spinning else "0"
            o.add_session_config_entry("session.intra_op.allow_spinning", spin)
            o.add_session_config_entry("session.inter_op.allow_spinning", spin)
            o.enable_cpu_mem_arena = arena
            return o

        self._sessions: dict[str, ort.InferenceSession] = {}
        self._shrink = ort.RunOptions()  # after the call, the arena's unused regions go back
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._shrinking: set[str] = set()
        self._slots: dict[str, dict[str, list]] = {}  # slotted models: their slot inputs' shapes
        self._empty_slots: dict[str, dict[str, np.ndarray]] = {}  # their factors for a call without adapters
        for name, spec in repository.models.items():
            if spec.model_file is None or spec.model_file.suffix != ".onnx":
                continue  # TensorRT plans only run on Triton
            slotted = spec.model_file.with_name(SLOTTED_GRAPH)
            self._sessions[name] = session = ort.InferenceSession(
                str(slotted if slotted.exists() else spec.model_file),
                sess_options=options(arena=not releases_activations(spec)), providers=["CPUExecutionProvider"])
            if shrinks_arena(spec):
                self._shrinking.add(name)
            if slotted.exists():
                self._slots[name] = {i.name: i.shape for i in session.get_inputs() if is_slot_input(i.name)}
                self._empty_slots[name] = slot_inputs(name, self._slots[name], [], np.zeros((0, 0), np.float32))
        self._specs = {name: repository[name] for name in self._sessions}

    def models(self) -> dict[str, ModelSpec]:
        return self._specs

    def adapter_slots(self, model: str) -> dict[str, list] | None:
        return self._slots.get(model)

    async def _execute(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._sessions[spec.name]
        feeds = {t.name: graph_shaped(spec, t, inputs[t.name]) for t in spec.inputs}  # as Triton reshapes them
        names = [t.name for t in spec.outputs]
        first = next(iter(feeds.values()), None)
        if spec.max_batch_size > 0 and first is not None:
            rows, key = max(1, len(first)), (spec.name, first.shape[1:])
        else:
            rows, key = 1, (spec.name, getattr(first, "shape", ()))
        if spec.name in self._slots:  # the call's adapters, or empty slots
            given = {k: v for k, v in inputs.items() if is_slot_input(k)}
            feeds.update(given or {**self._empty_slots[spec.name], SCALE_INPUT: np.zeros((rows, 0), np.float32)})
        per_row = self._seconds_per_row.get(key)

        run_options = self._shrink if spec.name in self._shrinking else None

        def run():
            t0 = time.perf_counter()
            out = session.run(names, feeds, run_options)
            return out, time.perf_counter() - t0

        inline = self._runs_inline(per_row, rows)
        self._in_flight += 1
        try:
            if inline:
                values, seconds = run()
            else:  # a shape's first call, long ones, and any beside another call: in a worker thread
                values, seconds = await asyncio.to_thread(run)
        finally:
            self._in_flight -= 1
        took = seconds / rows
        self._seconds_per_row[key] = took if per_row is None else per_row + 0.2 * (took - per_row)
        return dict(zip(names, values))

    def _runs_inline(self, per_row: float | None, rows: int) -> bool:
        if per_row is None:  # not measured at this shape yet
            return False
        limit = self.inline_max_s
        if latency_first_requested() and self._in_flight == 0:
            limit = max(limit, self.alone_inline_max_s)
        return per_row * rows <= limit

    def runs_inline(self, model: str, rows: int, row_shape: tuple) -> bool:
        """Whether a call of `rows` rows of `row_shape` (its first input's, without the batch)
        would run on the calling thread now."""
        return self._runs_inline(self._seconds_per_row.get((model, tuple(row_shape))), rows)
