"""Embedded backend: ONNX Runtime sessions in this process, read from the repository.

Sessions are opened once at start-up. `session.run` releases the GIL, so calls run in
worker threads and the event loop stays free for other requests.
"""

from __future__ import annotations

import asyncio
from typing import Mapping

import numpy as np
import onnxruntime as ort

from services.runtime.base import InferenceBackend
from services.runtime.repository import ModelRepository, ModelSpec


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(self, repository: ModelRepository, intra_op_threads: int = 0, inter_op_threads: int = 0):
        super().__init__()
        self.repository = repository
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        self._sessions: dict[str, ort.InferenceSession] = {}
        for name, spec in repository.models.items():
            if spec.model_file is None or spec.model_file.suffix != ".onnx":
                continue  # TensorRT plans only run on Triton
            self._sessions[name] = ort.InferenceSession(
                str(spec.model_file), sess_options=options, providers=["CPUExecutionProvider"]
            )
        self._specs = {name: repository[name] for name in self._sessions}

    def models(self) -> dict[str, ModelSpec]:
        return self._specs

    async def _execute(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._sessions[spec.name]
        feeds = {}
        for t in spec.inputs:
            x = inputs[t.name]
            if t.reshape is not None:  # Triton's config-level reshape, applied the same way
                x = x.reshape((x.shape[0], *t.reshape) if spec.max_batch_size > 0 else t.reshape)
            feeds[t.name] = x
        names = [t.name for t in spec.outputs]
        values = await asyncio.to_thread(session.run, names, feeds)
        return dict(zip(names, values))
