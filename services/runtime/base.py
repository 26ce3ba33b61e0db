"""The one interface every inference backend implements.

Pipelines call `await backend.infer(model, inputs)` with tensors in Triton's wire shapes
([batch, *dims] per the model config) and get the named outputs back. Whether the graph
runs in this process (ONNX Runtime) or in a Triton server is configuration, not code.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from services.adapters import is_slot_input, is_slot_weight
from services.runtime.repository import ModelSpec, TensorInfo

# Called after each model execution with (model, backend, batch size, seconds).
ExecutionObserver = Callable[[str, str, int, float], None]

_latency_first: contextvars.ContextVar[bool] = contextvars.ContextVar("genserve_latency_first", default=False)


@contextlib.contextmanager
def latency_first(on: bool = True) -> Iterator[None]:
    """Model calls made inside (in this task) put their own latency before overlapping other
    work: the embedded backend runs short ones on the calling thread, sparing the hand-off to
    a worker and back. For a caller that knows nothing else is waiting (the step engine
    serving a single request)."""
    token = _latency_first.set(on)
    try:
        yield
    finally:
        _latency_first.reset(token)


def latency_first_requested() -> bool:
    return _latency_first.get()


class InferenceBackend(abc.ABC):
    name: str
    # Its models run on this worker's own CPU cores (the embedded backend), not on a device or
    # another server's: work beside a call then competes with it (GENSERVE_ENGINE_OVERLAP=auto).
    computes_on_worker_cores = False

    def __init__(self) -> None:
        self._observers: list[ExecutionObserver] = []
        self._narrowed: dict[tuple, ModelSpec] = {}  # (model, outputs) -> its spec narrowed to them

    def add_observer(self, observer: ExecutionObserver) -> None:
        self._observers.append(observer)

    @abc.abstractmethod
    def models(self) -> dict[str, ModelSpec]:
        """The models this backend serves, by name."""

    @abc.abstractmethod
    async def _execute(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs one batch; inputs are validated and in wire shapes."""

    async def is_ready(self) -> bool:
        return True

    def adapter_slots(self, model: str) -> Mapping[str, Sequence] | None:
        """The shapes of the slot inputs (services.adapters) this backend serves `model` with,
        None where it serves it without adapter slots (this default)."""
        return None

    async def close(self) -> None:
        return None

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Runs the model on a batch of any size: batches past the model's max_batch_size
        are split into executions the model accepts, and the outputs concatenated.
        `outputs`: the outputs to fetch (default all); Triton sends back only those.
        Slot inputs (services.adapters) go along where adapter_slots(model) has them; their
        factors, which have no batch axis, go whole to every execution."""
        spec = self.models()[model]
        if outputs is not None:  # once per (model, outputs): the step engine asks every iteration
            key = (model, tuple(outputs))
            spec = self._narrowed.get(key) or self._narrowed.setdefault(key, select_outputs(spec, outputs))
        limit = spec.max_batch_size
        batch = len(next(v for k, v in inputs.items() if not is_slot_weight(k))) if limit > 0 else 1
        if limit <= 0 or batch <= limit:
            return await self._run(spec, inputs)
        parts = [await self._run(spec, {k: v if is_slot_weight(k) else v[i:i + limit] for k, v in inputs.items()})
                 for i in range(0, batch, limit)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    async def _run(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        slotted = [k for k in inputs if is_slot_input(k)]
        if slotted and self.adapter_slots(spec.name) is None:
            raise ValueError(f"{spec.name} is served without adapter slots: no input {slotted[0]!r}")
        batch = validate_inputs(spec, {k: v for k, v in inputs.items() if not is_slot_input(k)} if slotted else inputs)
        start = time.perf_counter()
        outputs = await self._execute(spec, inputs)
        seconds = time.perf_counter() - start
        for observe in self._observers:
            observe(spec.name, self.name, batch, seconds)
        return outputs


def graph_shaped(spec: ModelSpec, t: TensorInfo, x: np.ndarray) -> np.ndarray:
    """`x`, in the config's wire shape, in the shape the graph sees: Triton's config-level
    reshape of tensor `t` (per sample when the model batches), applied as Triton applies it."""
    if t.reshape is None:
        return x
    return x.reshape((len(x), *t.reshape) if spec.max_batch_size > 0 else t.reshape)


def wire_shaped(spec: ModelSpec, t: TensorInfo, x: np.ndarray) -> np.ndarray:
    """The reverse of graph_shaped: a graph's output `x` in the config's dims."""
    if t.reshape is None:
        return x
    return x.reshape((len(x), *t.dims) if spec.max_batch_size > 0 else t.dims)


def select_outputs(spec: ModelSpec, names: Sequence[str] | None) -> ModelSpec:
    """`spec` narrowed to the outputs `names` (all of them for None): backends fetch what
    their spec lists."""
    if names is None:
        return spec
    known = {t.name: t for t in spec.outputs}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"{spec.name}: no output {missing}; it has {sorted(known)}")
    return dataclasses.replace(spec, outputs=tuple(known[n] for n in names))


def validate_inputs(spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> int:
    """Checks names, dtypes and shapes against the config, as Triton does; returns the batch.

    A mismatch here is a pipeline bug, not a client error, hence ValueError.
    """
    expected = {t.name for t in spec.inputs}
    if set(inputs) != expected:
        raise ValueError(f"{spec.name}: inputs {sorted(inputs)} != config inputs {sorted(expected)}")
    batches = set()
    for t in spec.inputs:
        x = inputs[t.name]
        if x.dtype != t.dtype:
            raise ValueError(f"{spec.name}.{t.name}: dtype {x.dtype} != {t.dtype}")
        sample_shape = x.shape[1:] if spec.max_batch_size > 0 else x.shape
        if len(sample_shape) != len(t.dims) or any(d not in (-1, s) for d, s in zip(t.dims, sample_shape)):
            raise ValueError(f"{spec.name}.{t.name}: shape {x.shape} does not match dims {t.dims}")
        if spec.max_batch_size > 0:
            batches.add(x.shape[0])
    if len(batches) > 1:
        raise ValueError(f"{spec.name}: inputs disagree on the batch size: {sorted(batches)}")
    batch = batches.pop() if batches else 1
    if spec.max_batch_size > 0 and not 1 <= batch <= spec.max_batch_size:
        raise ValueError(f"{spec.name}: batch {batch} outside 1..{spec.max_batch_size}")
    return batch
