"""Adaptive batching for single-pass models on the embedded backend.

Concurrent calls to one model (GAN requests arriving together) are merged into one
execution, up to the model's max_batch_size and a short wait, then split back —
what Triton's dynamic batcher does server-side, done here for the in-process backend.
Each caller's rows are its own: outputs do not depend on who shared the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.errors import BackendUnavailable
from services.runtime.base import ExecutionObserver, InferenceBackend
from services.runtime.repository import ModelSpec


@dataclass
class _Pending:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def signature(self) -> tuple:
        """Calls merge only when their per-sample shapes and dtypes agree."""
        return tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(self.inputs.items()))


class AdaptiveBatcher(InferenceBackend):
    def __init__(self, inner: InferenceBackend, batched_models: set[str], max_wait_s: float):
        super().__init__()
        self.inner = inner
        self.name = inner.name
        self.computes_on_worker_cores = inner.computes_on_worker_cores
        self.batched_models = batched_models
        self.max_wait_s = max_wait_s
        self._queues: dict[str, asyncio.Queue] = {}
        self._workers: dict[str, asyncio.Task] = {}

    def models(self) -> dict[str, ModelSpec]:
        return self.inner.models()

    def add_observer(self, observer: ExecutionObserver) -> None:
        self.inner.add_observer(observer)

    async def is_ready(self) -> bool:
        return await self.inner.is_ready()

    def adapter_slots(self, model: str) -> Mapping[str, Sequence] | None:
        return self.inner.adapter_slots(model)

    async def _execute(self, spec, inputs):  # pragma: no cover - infer() is overridden
        raise NotImplementedError

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await self.inner.close()

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        limit = self.models()[model].max_batch_size
        if model not in self.batched_models or limit <= 0 or self.max_wait_s <= 0 or outputs is not None:
            return await self.inner.infer(model, inputs, outputs)
        item = _Pending(inputs, len(next(iter(inputs.values()))))
        if item.rows >= limit:
            return await self.inner.infer(model, inputs)
        if model not in self._queues:
            self._queues[model] = asyncio.Queue()
        worker = self._workers.get(model)
        if worker is None or worker.done():
            self._workers[model] = asyncio.get_running_loop().create_task(self._collect(model, limit))
        self._queues[model].put_nowait(item)
        return await item.future

    async def _collect(self, model: str, limit: int) -> None:
        queue = self._queues[model]
        carry: list[_Pending] = []
        while True:
            # 1. Wait for work, then gather more until the batch is full or the wait is over.
            group = carry or [await queue.get()]
            carry = []
            rows = sum(p.rows for p in group)
            deadline = time.monotonic() + self.max_wait_s
            while rows < limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
                if item.signature != group[0].signature or rows + item.rows > limit:
                    carry.append(item)  # starts the next batch
                    break
                group.append(item)
                rows += item.rows
            # 2. One execution, split back per caller.
            merged = {k: np.concatenate([p.inputs[k] for p in group]) for k in group[0].inputs}
            try:
                outputs = await self.inner.infer(model, merged)
            except Exception as exc:
                await self._one_by_one(model, group, exc)
                continue
            offset = 0
            for p in group:
                if not p.future.done():
                    p.future.set_result({k: v[offset:offset + p.rows] for k, v in outputs.items()})
                offset += p.rows

    async def _one_by_one(self, model: str, group: list[_Pending], exc: Exception) -> None:
        """A failed batch is retried per caller, so one bad input fails only its own call.
        An outage is nobody's input: every caller gets it at once, without N more calls."""
        if len(group) == 1 or isinstance(exc, BackendUnavailable):
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p in group:
            try:
                result = await self.inner.infer(model, p.inputs)
            except Exception as own:
                if not p.future.done():
                    p.future.set_exception(own)
            else:
                if not p.future.done():
                    p.future.set_result(result)
