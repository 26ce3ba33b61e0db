"""Triton backend: the same models, run by a Triton server over gRPC (asyncio).

The service still reads the local copy of the model repository for the model specs and
the files pipelines need (tokenizer, scheduler config); Triton serves the graphs from
the same repository. An unreachable Triton becomes BackendUnavailable (HTTP 503 naming
Triton), never a hang: every call has a deadline, and gRPC's reconnect backoff is kept
short so the service recovers by itself within seconds of Triton coming back.
"""

from __future__ import annotations

import asyncio
import re
from typing import Mapping

import grpc
import grpc.aio
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from services.errors import BackendUnavailable, InferenceFailed, ServiceError
from services.runtime.base import InferenceBackend
from services.runtime.repository import ModelRepository, ModelSpec

# gRPC status codes that mean "Triton cannot serve right now", not "your request is wrong".
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                "StatusCode.UNKNOWN", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.ABORTED"}
# While a model loads, unloads or is reloaded, Triton answers NOT_FOUND / INTERNAL / ... with
# messages like "Request for unknown model: 'x' has no available versions" or "... is not ready":
# the model will be back, so these are outages too. The message tells them from real failures.
_MODEL_NOT_SERVING = re.compile(
    r"unknown model|no available versions?|not ready|not found|unavailable|not loaded|is not available", re.I)
_MAX_MESSAGE = 2**31 - 1


def classify_error(exc: BaseException, url: str, model: str) -> tuple[ServiceError, bool]:
    """A failed Triton call -> (the service error to raise, whether the connection is suspect).

    BackendUnavailable (503, retry later) for everything that is not the request's fault:
    unreachable or overloaded server, timeouts, a model that is (un)loading, and any
    transport error that is not an InferenceServerException. InferenceFailed (500) only
    when Triton ran the model and it failed. The flag says a retry should use a fresh
    channel (connection-level trouble, as opposed to a model that is not loaded)."""
    if isinstance(exc, InferenceServerException):
        status, message = exc.status() or "", exc.message() or str(exc)
        model_down = bool(_MODEL_NOT_SERVING.search(message))
        if status in _UNAVAILABLE or (status and model_down):
            reconnect = status in ("StatusCode.UNAVAILABLE", "StatusCode.UNKNOWN") and not model_down
            return BackendUnavailable(f"Triton at {url} is unavailable for model {model!r} ({status}): {message}"), \
                reconnect
        return InferenceFailed(f"Triton failed model {model!r} ({status or 'client error'}): {message}"), False
    # grpc errors raised past tritonclient's wrapper, closed channels, sockets, timeouts.
    return BackendUnavailable(f"Triton at {url} is unreachable for model {model!r}: "
                              f"{type(exc).__name__}: {exc}"), True


# What a call to Triton can raise besides InferenceServerException: all transport trouble.
_TRANSPORT_ERRORS = (grpc.RpcError, grpc.aio.BaseError, OSError, asyncio.TimeoutError)


class TritonBackend(InferenceBackend):
    name = "triton"

    def __init__(self, repository: ModelRepository, url: str, timeout_s: float = 60.0):
        super().__init__()
        self.url = url
        self.timeout_s = timeout_s
        self._specs = dict(repository.models)
        self._client: grpcaio.InferenceServerClient | None = None
        # Channels dropped after connection errors, each with the task that closes it later.
        self._retired: dict[asyncio.Task, grpcaio.InferenceServerClient] = {}

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
        except (InferenceServerException, *_TRANSPORT_ERRORS):
            return False

    async def close(self) -> None:
        for task, old in list(self._retired.items()):
            task.cancel()
            await old.close()
        self._retired.clear()
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
        except (InferenceServerException, *_TRANSPORT_ERRORS) as exc:
            error, reconnect = classify_error(exc, self.url, spec.name)
            if reconnect:
                self._reset_client()
            raise error from None
        return {t.name: result.as_numpy(t.name) for t in spec.outputs}

    def _reset_client(self) -> None:
        """The next call opens a fresh channel. The old one is closed after a grace period
        rather than now, so calls still in flight on it are not cut short by us."""
        old, self._client = self._client, None
        if old is not None:
            async def close_later() -> None:
                await asyncio.sleep(self.timeout_s)
                await old.close()
            task = asyncio.get_running_loop().create_task(close_later())
            self._retired[task] = old
            task.add_done_callback(lambda t: self._retired.pop(t, None))
