"""Triton backend: the same models, run by a Triton server over gRPC (asyncio).

The service still reads the local copy of the model repository for the model specs and
the files pipelines need (tokenizer, scheduler config); Triton serves the graphs from
the same repository. An unreachable Triton becomes BackendUnavailable (HTTP 503 naming
Triton), never a hang: every call has a deadline, and gRPC's reconnect backoff is kept
short so the service recovers by itself within seconds of Triton coming back.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from services.errors import BackendUnavailable, InferenceFailed
from services.runtime.base import InferenceBackend
from services.runtime.repository import ModelRepository, ModelSpec

# gRPC status codes that mean "Triton is not there (yet)", not "your request is wrong".
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                "StatusCode.UNKNOWN"}
_MAX_MESSAGE = 2**31 - 1


class TritonBackend(InferenceBackend):
    name = "triton"

    def __init__(self, repository: ModelRepository, url: str, timeout_s: float = 60.0):
        super().__init__()
        self.url = url
        self.timeout_s = timeout_s
        self._specs = dict(repository.models)
        self._client: grpcaio.InferenceServerClient | None = None

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        # Created lazily, inside the event loop that will use it.
        if self._client is None:
            self._client = grpcaio.InferenceServerClient(self.url, channel_args=[
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ])
        return self._client

    def models(self) -> dict[str, ModelSpec]:
        return self._specs

    async def is_ready(self) -> bool:
        """Ready when Triton is, and every model the service needs is loaded there."""
        try:
            if not await self.client.is_server_ready(client_timeout=2):
                return False
            for name in self._specs:
                if not await self.client.is_model_ready(name, client_timeout=2):
                    return False
            return True
        except InferenceServerException:
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _execute(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        infer_inputs = []
        for t in spec.inputs:
            x = np.ascontiguousarray(inputs[t.name])
            item = grpcclient.InferInput(t.name, list(x.shape), np_to_triton_dtype(x.dtype))
            item.set_data_from_numpy(x)
            infer_inputs.append(item)
        outputs = [grpcclient.InferRequestedOutput(t.name) for t in spec.outputs]
        try:
            result = await self.client.infer(spec.name, infer_inputs, outputs=outputs,
                                             client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            if exc.status() in _UNAVAILABLE:
                raise BackendUnavailable(
                    f"Triton at {self.url} is unavailable ({exc.status()}): {exc.message()}") from None
            raise InferenceFailed(f"Triton failed model {spec.name!r}: {exc.message()}") from None
        return {t.name: result.as_numpy(t.name) for t in spec.outputs}
