"""Triton backend: the same models, run by a Triton server over gRPC (asyncio).

The service still reads the local copy of the model repository for the model specs and
the files pipelines need (tokenizer, scheduler config); Triton serves the graphs from
the same repository. An unreachable Triton becomes BackendUnavailable (HTTP 503 naming
Triton), never a hang: every call has a deadline, and gRPC's reconnect backoff is kept
short so the service recovers by itself within seconds of Triton coming back.

Same host, no socket copies: with shared memory on (`auto`, the default, or `required`),
tensors travel through system shared-memory regions (services.runtime.triton_shm) and
the gRPC request carries only where they lie. Whether Triton can open this process's
regions is negotiated, not assumed: a probe region is registered at start-up (and again
after a failure); if Triton cannot open it -- another host, or a container without the
shared /dev/shm -- `auto` falls back to the socket, logged and counted in the metrics,
and `required` refuses to start. A region Triton stops knowing mid-run (Triton restarted)
is re-registered and the call retried; if that fails too the call goes over the socket
(`auto`) or fails as unavailable (`required`). Which way tensors travel never changes the
numbers: the same bytes reach the same graph.

LoRA adapters (services.adapters): a call with slot inputs goes to the model's slotted graph,
Triton model `<model>_lora` (the repository's `adapter_slots`); a call without them to the
plain model, which has no slots to pay for. The adapters' factors, the bulk of such a call, are
the same arrays call after call while a batch's adapters stay the same (PipelineAdapters keeps
them per graph): they are written once into a pinned region, registered once, and every call
names them there; the region goes once those arrays are gone (a new combination of adapters).
Over the socket (shared memory off or unusable) they travel with every call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from services.adapters import SCALE_INPUT, is_slot_input, is_slot_weight
from services.errors import BackendUnavailable, InferenceFailed, ServiceError
from services.runtime.base import InferenceBackend, graph_shaped, wire_shaped
from services.runtime.repository import ModelRepository, ModelSpec
from services.runtime.triton_shm import (
    SHM_DIR,
    SHM_ERROR,
    Region,
    RegionPool,
    aligned,
    is_stale,
    process_prefix,
    region_prefix,
    sweep_stale,
)

log = logging.getLogger("genserve.triton")

SHARED_MEMORY_MODES = ("auto", "off", "required")
# Transports, as GET-able state and metric labels.
SHARED_MEMORY, SOCKET, PENDING = "shared_memory", "socket", "pending"

# gRPC status codes that mean "Triton cannot serve right now", not "your request is wrong".
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                "StatusCode.UNKNOWN", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.ABORTED"}
# While a model loads, unloads or is reloaded, Triton answers NOT_FOUND / INTERNAL / ... with
# messages like "Request for unknown model: 'x' has no available versions" or "... is not ready":
# the model will be back, so these are outages too. The message tells them from real failures.
_MODEL_NOT_SERVING = re.compile(
    r"unknown model|no available versions?|not ready|not found|unavailable|not loaded|is not available", re.I)
_MAX_MESSAGE = 2**31 - 1
# Pinned factor regions kept while their arrays live: the step engine needs one per slotted
# graph (its batch's adapters); more only for callers that hold several sets of factors.
MAX_PINNED_FACTORS = 8


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
            return BackendUnavailable(f"Triton is unavailable for model {model!r}; retry",
                                      detail=f"Triton at {url} ({status}): {message}"), reconnect
        return InferenceFailed(f"Triton failed model {model!r}; the request id is in the server log",
                               detail=f"Triton at {url} ({status or 'client error'}): {message}"), False
    # grpc errors raised past tritonclient's wrapper, closed channels, sockets, timeouts.
    return BackendUnavailable(f"Triton is unreachable for model {model!r}; retry",
                              detail=f"Triton at {url}: {type(exc).__name__}: {exc}"), True


# What a call to Triton can raise besides InferenceServerException: all transport trouble.
_TRANSPORT_ERRORS = (grpc.RpcError, grpc.aio.BaseError, OSError, asyncio.TimeoutError)


def _release_at_exit(pool: RegionPool, url: str) -> None:
    regions = pool.clear()
    if not regions:
        return
    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            for region in regions:
                client.unregister_system_shared_memory(region.name, client_timeout=1)
        finally:
            client.close()
    except Exception:  # exiting: Triton down or gone is fine
        pass


@dataclasses.dataclass(eq=False)
class PinnedFactors:
    """One call's adapter factors in a pinned region, registered with Triton: valid while
    the arrays it was written from live (`refs`); `users`: calls naming it now."""

    region: Region
    refs: list[weakref.ref]
    inputs: list  # InferInputs pointing into the region, shared by the calls (read-only)
    users: int = 0

    def alive(self) -> bool:
        return all(ref() is not None for ref in self.refs)


class SharedMemoryFailure(Exception):
    """Triton could not use a region named in a request (unknown to it, or too small)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.output_too_small = "to hold the results" in message


class TritonUnreachable(Exception):
    """The negotiation could not reach Triton (nothing was learnt about shared memory)."""


class TritonBackend(InferenceBackend):
    name = "triton"

    def __init__(self, repository: ModelRepository, url: str, timeout_s: float = 60.0,
                 shared_memory: str = "auto", shm_dir: Path = SHM_DIR, max_regions: int = 32,
                 reprobe_s: float = 60.0, metrics=None):
        """`shared_memory`: auto | off | required (see the module doc). `shm_dir`: where this
        process creates regions, which must be the directory Triton's shm_open sees
        (/dev/shm); `max_regions` bounds concurrent shared-memory calls (more wait for
        nothing: they take the socket). `reprobe_s`: after a fallback, how often `auto`
        asks again. `metrics`: a services.metrics.ServiceMetrics, or None."""
        super().__init__()
        if shared_memory not in SHARED_MEMORY_MODES:
            raise ValueError(f"shared_memory must be one of {', '.join(SHARED_MEMORY_MODES)}, got {shared_memory!r}")
        self.url = url
        self.timeout_s = timeout_s
        self._specs = dict(repository.models)
        self._slotted = dict(repository.adapter_slots)  # model -> its slotted graph's Triton model
        self._slotted_calls: dict[tuple, ModelSpec] = {}  # (model, outputs) -> the slotted call's spec
        # (model, factor arrays by identity) -> their pinned region.
        self._pinned: OrderedDict[tuple, PinnedFactors] = OrderedDict()
        self._pinning: dict[tuple, asyncio.Future] = {}  # keys being pinned now, for concurrent calls to wait on
        self._client: grpcaio.InferenceServerClient | None = None
        # Channels dropped after connection errors, each with the task that closes it later.
        self._retired: dict[asyncio.Task, grpcaio.InferenceServerClient] = {}

        self.shared_memory = shared_memory
        self.transport = SOCKET if shared_memory == "off" else PENDING
        self.transport_reason = "GENSERVE_TRITON_SHARED_MEMORY=off" if shared_memory == "off" else \
            "not negotiated yet (Triton not reached)"
        self.reprobe_s = reprobe_s
        self._host_prefix = region_prefix()
        self._pool = RegionPool(Path(shm_dir), process_prefix(self._host_prefix), max_regions)
        self._generation = 0  # bumped whenever the pool is dropped after a failure
        self._recovering = False  # regions dropped after a failure, none registered since
        self._next_probe = 0.0
        self._lock: asyncio.Lock | None = None
        # (model, input shapes) -> [(output, dtype, shape)]: what a call's outputs will take.
        self._output_shapes: OrderedDict[tuple, list[tuple[str, np.dtype, tuple]]] = OrderedDict()
        self.counters = {"shared_memory_calls": 0, "socket_calls": 0, "fallbacks": 0, "recoveries": 0,
                         "adapter_factor_registrations": 0}
        self._metrics = metrics
        # A process that exits without close() (BentoML's worker does) still unregisters
        # its regions and removes their files; one that is killed leaves both to the next
        # service on this host (_sweep_triton).
        weakref.finalize(self, _release_at_exit, self._pool, url)
        if shared_memory != "off":
            self._negotiate_at_start()

    # -- shared-memory negotiation ---------------------------------------------------------
    def shared_memory_status(self) -> dict:
        """What GET /v1/models and the logs tell: mode, transport in use and why."""
        return {"mode": self.shared_memory, "transport": self.transport, "reason": self.transport_reason,
                "regions": len(self._pool.regions), "region_bytes": self._pool.bytes,
                "region_allocations": self._pool.allocations, **self.counters}

    def _negotiate_at_start(self) -> None:
        """Start-up: `required` waits up to the call timeout for Triton, then negotiates
        and raises if shared memory does not work; `auto` tries once, briefly, and leaves
        the rest to the first call (Triton may still be loading models)."""
        deadline = time.monotonic() + (self.timeout_s if self.shared_memory == "required" else 0)
        while True:
            try:
                self._apply_probe(self._probe())
                break
            except TritonUnreachable as exc:
                if time.monotonic() >= deadline:
                    if self.shared_memory == "required":
                        raise RuntimeError(f"GENSERVE_TRITON_SHARED_MEMORY=required: Triton at {self.url} "
                                           f"was not reachable to negotiate shared memory: {exc}") from None
                    log.info("Triton at %s not reachable at start-up: shared memory negotiated on first use",
                             self.url)
                    return
                time.sleep(1.0)
        if self.shared_memory == "required" and self.transport != SHARED_MEMORY:
            raise RuntimeError(f"GENSERVE_TRITON_SHARED_MEMORY=required, but Triton at {self.url} cannot use "
                               f"this process's shared memory: {self.transport_reason}")

    def _probe(self) -> str | None:
        """Registers a small probe region with Triton, checks Triton lists it, unregisters
        it. None when Triton opened it; else Triton's reason. Blocking (sync client): runs
        at start-up and, later, in a worker thread. Also unregisters regions that dead
        service processes of this host left registered, and removes their files."""
        client = grpcclient.InferenceServerClient(self.url)
        timeout = min(5.0, self.timeout_s)
        probe = None
        try:
            try:
                self._sweep_triton(client, timeout)
                probe = Region.create(self._pool.directory, f"{self._pool.prefix}probe", 4096)
            except OSError as exc:
                return f"cannot create a region in {self._pool.directory}: {exc}"
            try:
                client.register_system_shared_memory(probe.name, probe.key, probe.size, client_timeout=timeout)
                listed = client.get_system_shared_memory_status(probe.name, as_json=True,
                                                                client_timeout=timeout).get("regions", {})
                client.unregister_system_shared_memory(probe.name, client_timeout=timeout)
            except InferenceServerException as exc:
                error, _ = classify_error(exc, self.url, "shared memory probe")
                if isinstance(error, BackendUnavailable):
                    raise TritonUnreachable(str(exc)) from None
                return f"Triton could not register region {probe.key}: {exc.message() or exc}"
            if probe.name not in listed or listed[probe.name].get("key") != probe.key:
                return f"Triton registered the probe region but does not list it ({listed})"
            return None
        finally:
            if probe is not None:
                probe.destroy()
            client.close()

    def _sweep_triton(self, client, timeout: float) -> None:
        sweep_stale(self._pool.directory, self._host_prefix)
        try:
            regions = client.get_system_shared_memory_status(as_json=True, client_timeout=timeout).get("regions", {})
        except InferenceServerException as exc:
            if isinstance(classify_error(exc, self.url, "shared memory status")[0], BackendUnavailable):
                raise TritonUnreachable(str(exc)) from None
            return
        for name in regions:
            if is_stale(name, self._host_prefix):
                client.unregister_system_shared_memory(name, client_timeout=timeout)
                log.info("unregistered shared-memory region %s left in Triton by a process that is gone", name)

    def _apply_probe(self, failure: str | None) -> None:
        before = self.transport
        if failure is None:
            self.transport, self.transport_reason = SHARED_MEMORY, \
                f"Triton opened a probe region in {self._pool.directory}"
            if before != SHARED_MEMORY:
                log.info("Triton at %s: tensors through shared memory (%s)", self.url, self._pool.directory)
        else:
            self.transport, self.transport_reason = SOCKET, failure
            self._next_probe = time.monotonic() + self.reprobe_s
            self.counters["fallbacks"] += 1
            log.warning("Triton at %s: shared memory unusable, tensors through the gRPC socket "
                        "(GENSERVE_TRITON_SHARED_MEMORY=%s): %s", self.url, self.shared_memory, failure)
        self._report()

    async def _ensure_negotiated(self) -> None:
        """Negotiates when pending, or when a fallback's re-probe is due (`auto`)."""
        if self.transport == SHARED_MEMORY or self.shared_memory == "off":
            return
        if self.transport == SOCKET and time.monotonic() < self._next_probe:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.transport == SHARED_MEMORY or (self.transport == SOCKET and time.monotonic() < self._next_probe):
                return
            try:
                failure = await asyncio.to_thread(self._probe)
            except TritonUnreachable as exc:
                self._next_probe = time.monotonic() + 1.0
                if self.shared_memory == "required":
                    raise BackendUnavailable("Triton is unreachable; retry",
                                             detail=f"Triton at {self.url}: {exc}") from None
                return  # the call itself will say so (or succeed: Triton just came back)
            self._apply_probe(failure)

    async def _shared_memory_failed(self, generation: int, message: str) -> None:
        """A region failed mid-run (Triton restarted and knows none, or one was removed):
        drop them all, unregistering what Triton may still hold. The retry registers a
        fresh region, which is the probe: if Triton cannot open it, the caller falls back.
        Concurrent failures of one generation do this once."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if generation != self._generation:
                return
            self._generation += 1
            log.warning("Triton at %s: a shared-memory call failed (%s); registering regions again",
                        self.url, message)
            self._pinned.clear()
            await self._unregister(self._pool.clear())
            self._recovering = True
            self._report()

    async def _unregister(self, regions: list[Region]) -> None:
        """Best effort, all at once: Triton down means a restarted one knows none of them,
        and a live one that missed this is swept by the next probe on this host."""
        async def one(region: Region) -> None:
            try:
                await self.client.unregister_system_shared_memory(region.name, client_timeout=2)
            except (InferenceServerException, *_TRANSPORT_ERRORS):
                pass
        await asyncio.gather(*(one(r) for r in regions))

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.observe_triton_shared_memory(self.transport == SHARED_MEMORY, self._pool.bytes)

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

    def adapter_slots(self, model: str) -> dict[str, list] | None:
        spec = self._slotted.get(model)
        return None if spec is None else {t.name: list(t.dims) for t in spec.inputs if is_slot_input(t.name)}

    async def is_ready(self) -> bool:
        """Ready when Triton is, and every model the service needs is loaded there (and,
        with shared memory `required`, when Triton can use this process's regions)."""
        try:
            if not await self.client.is_server_ready(client_timeout=2):
                return False
            for name in (*self._specs, *(spec.name for spec in self._slotted.values())):
                if not await self.client.is_model_ready(name, client_timeout=2):
                    return False
            await self._ensure_negotiated()  # Triton just became reachable: decide now
        except (InferenceServerException, BackendUnavailable, *_TRANSPORT_ERRORS):
            return False
        return self.shared_memory != "required" or self.transport == SHARED_MEMORY

    async def close(self) -> None:
        """Unregisters this process's regions from Triton and removes them, then closes
        the channels."""
        self._pinned.clear()
        regions = self._pool.clear()
        if regions and self._client is not None:
            await self._unregister(regions)
        self._report()
        for task, old in list(self._retired.items()):
            task.cancel()
            await old.close()
        self._retired.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _execute(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if SCALE_INPUT not in inputs:
            return await self._execute_any(spec, inputs)
        # The slotted graph: its whole shapes (max_batch_size 0), the factors kept apart.
        call = self._slotted_spec(spec)
        graph_inputs = {t.name: graph_shaped(spec, t, inputs[t.name]) for t in spec.inputs}
        graph_inputs[SCALE_INPUT] = inputs[SCALE_INPUT]
        factors = {k: v for k, v in inputs.items() if is_slot_weight(k)}
        values = await self._execute_any(call, graph_inputs, factors)
        return {t.name: wire_shaped(spec, t, values[t.name]) for t in spec.outputs}

    def _slotted_spec(self, spec: ModelSpec) -> ModelSpec:
        """The slotted model's spec for a call of `spec` (its outputs), less the factor inputs,
        which travel apart (_pin_factors)."""
        key = (spec.name, tuple(t.name for t in spec.outputs))
        call = self._slotted_calls.get(key)
        if call is None:
            slotted = self._slotted[spec.name]
            wanted = {t.name for t in spec.outputs}
            call = self._slotted_calls[key] = dataclasses.replace(
                slotted, inputs=tuple(t for t in slotted.inputs if not is_slot_weight(t.name)),
                outputs=tuple(t for t in slotted.outputs if t.name in wanted))
        return call

    async def _execute_any(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray],
                           factors: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        if self.shared_memory != "off" and not any(inputs[t.name].dtype == object for t in spec.inputs):
            await self._ensure_negotiated()
            for attempt in range(2):
                if self.transport != SHARED_MEMORY:
                    break
                generation = self._generation
                try:
                    values = await self._execute_shared(spec, inputs, factors)
                    if self._recovering:
                        self._recovering = False
                        self.counters["recoveries"] += 1
                        log.info("Triton at %s: shared memory registered again", self.url)
                    return values
                except SharedMemoryFailure as exc:
                    if exc.output_too_small:  # an output shape guessed wrong: this call by socket
                        break
                    if attempt == 0:
                        await self._shared_memory_failed(generation, str(exc))
                    else:
                        self._recovering = False
                        self._apply_probe(f"a fresh region failed too: {exc}")
            if self.shared_memory == "required" and self.transport != SHARED_MEMORY:
                raise BackendUnavailable("Triton cannot use shared memory (GENSERVE_TRITON_SHARED_MEMORY=required)",
                                         detail=f"Triton at {self.url}: {self.transport_reason}")
        return await self._execute_socket(spec, inputs, factors)

    @staticmethod
    def _shared_inputs(region: Region, offset: int, arrays) -> tuple[list, int]:
        """Writes `arrays` ((name, contiguous array)) into `region` from `offset`, each aligned;
        returns the inputs naming them there and the offset after them."""
        items = []
        for name, x in arrays:
            region.write(offset, x)
            item = grpcclient.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
            item.set_shared_memory(region.name, x.nbytes, offset)
            items.append(item)
            offset += aligned(x.nbytes)
        return items, offset

    @staticmethod
    def _raw_inputs(arrays) -> list:
        items = []
        for name, x in arrays:
            x = np.ascontiguousarray(x)
            item = grpcclient.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
            item.set_data_from_numpy(x)
            items.append(item)
        return items

    async def _execute_socket(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray],
                              factors: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        infer_inputs = self._raw_inputs([(t.name, inputs[t.name]) for t in spec.inputs])
        infer_inputs += self._raw_inputs(sorted((factors or {}).items()))
        outputs = [grpcclient.InferRequestedOutput(t.name) for t in spec.outputs]
        result = await self._infer(spec, infer_inputs, outputs)
        values = {t.name: result.as_numpy(t.name) for t in spec.outputs}
        self._learn_outputs(spec, inputs, values)
        self._count(spec.name, SOCKET)
        return values

    async def _execute_shared(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray],
                              factors: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """One call through a region of its own: inputs written at aligned offsets, the
        outputs (when their shapes are known from an earlier call with the same input
        shapes) placed after them; outputs of a first-seen shape come by socket once.
        Adapter `factors` are named where they are pinned (_pin_factors)."""
        arrays = [(t.name, np.ascontiguousarray(inputs[t.name])) for t in spec.inputs]
        known = self._output_shapes.get(self._shape_key(spec, inputs))
        needed = sum(aligned(a.nbytes) for _, a in arrays)
        if known is not None:
            needed += sum(aligned(int(np.prod(shape)) * dtype.itemsize) for _, dtype, shape in known)
        region = await self._take_region(needed)
        if region is None:  # every region is out on a call and the pool is at its bound
            return await self._execute_socket(spec, inputs, factors)
        pinned = None
        try:
            if factors:
                pinned = await self._pin_factors(spec.name, factors)
            infer_inputs = list(pinned.inputs) if pinned is not None else \
                self._raw_inputs(sorted((factors or {}).items()))
            placed_inputs, offset = self._shared_inputs(region, 0, arrays)
            infer_inputs += placed_inputs
            outputs, placed = [], {}
            for t in spec.outputs:
                item = grpcclient.InferRequestedOutput(t.name)
                outputs.append(item)
            if known is not None:
                for item, (name, dtype, shape) in zip(outputs, known):
                    nbytes = int(np.prod(shape)) * dtype.itemsize
                    item.set_shared_memory(region.name, nbytes, offset)
                    placed[name] = (offset, dtype)
                    offset += aligned(nbytes)
            result = await self._infer(spec, infer_inputs, outputs, shared=True)
            values = {}
            for t in spec.outputs:
                if t.name in placed:
                    shape = tuple(result.get_output(t.name).shape)  # as Triton wrote it
                    values[t.name] = region.read(placed[t.name][0], placed[t.name][1], shape)
                else:
                    values[t.name] = result.as_numpy(t.name)
        finally:
            self._pool.give_back(region)
            if pinned is not None:
                pinned.users -= 1
        if known is None:
            self._learn_outputs(spec, inputs, values)
        self._count(spec.name, SHARED_MEMORY)
        return values

    async def _pin_factors(self, model: str, factors: Mapping[str, np.ndarray]) -> PinnedFactors | None:
        """The pinned region holding these factor arrays (by identity), written and registered
        the first time they come; None when the pool is at its bound (they go by socket).
        Regions whose arrays are gone are unregistered first: those can never come again.
        Factors without elements (layers no adapter of the call targets) go by socket: nothing
        to send. The caller holds the result (`users`) until its call returns."""
        names = sorted(factors)
        key = (model, *((name, id(factors[name])) for name in names))
        while (pending := self._pinning.get(key)) is not None:  # another call is pinning them now
            await asyncio.shield(pending)
        pinned = self._pinned.get(key)
        if pinned is None or not pinned.alive():
            self._pinning[key] = done = asyncio.get_running_loop().create_future()
            try:
                pinned = await self._replace_pinned(key, [(name, factors[name]) for name in names])
            finally:
                del self._pinning[key]
                done.set_result(None)
            if pinned is None:
                return None
        self._pinned.move_to_end(key)
        pinned.users += 1
        return pinned

    async def _replace_pinned(self, key: tuple, factors: list[tuple[str, np.ndarray]]) -> PinnedFactors | None:
        """Unregisters the idle pinned regions that can go (dead arrays, past the bound), then
        pins `factors` under `key`."""
        stale = [k for k, p in self._pinned.items() if p.users == 0 and (k == key or not p.alive())]
        idle = [k for k, p in self._pinned.items() if p.users == 0 and k not in stale]
        stale += idle[:max(0, len(self._pinned) - len(stale) - MAX_PINNED_FACTORS + 1)]  # least recent first
        gone = [self._pinned.pop(k).region for k in stale]
        for region in gone:
            self._pool.drop(region)
        await self._unregister(gone)
        pinned = await self._pin(factors)
        if pinned is not None:
            self._pinned[key] = pinned
        return pinned

    async def _pin(self, factors: list[tuple[str, np.ndarray]]) -> PinnedFactors | None:
        shared = [(name, np.ascontiguousarray(x)) for name, x in factors if x.size]
        if not self._pool.can_grow():
            return None
        try:
            region = self._pool.pin(sum(aligned(x.nbytes) for _, x in shared))
        except OSError as exc:  # /dev/shm full (its sizeLimit) or gone
            raise SharedMemoryFailure(f"cannot create a region for adapter factors: {exc}") from None
        inputs = self._raw_inputs([(name, x) for name, x in factors if not x.size])
        inputs += self._shared_inputs(region, 0, shared)[0]
        await self._register(region)
        self.counters["adapter_factor_registrations"] += 1
        return PinnedFactors(region, [weakref.ref(x) for _, x in factors], inputs)

    async def _take_region(self, nbytes: int) -> Region | None:
        region = self._pool.take(nbytes)
        if region is not None and region.size >= nbytes:
            return region
        if region is not None:  # too small: replaced by a larger one
            self._pool.drop(region)
            try:
                await self.client.unregister_system_shared_memory(region.name, client_timeout=self.timeout_s)
            except (InferenceServerException, *_TRANSPORT_ERRORS):
                pass  # Triton restarted (it knows none) or is down: the next call says which
        if not self._pool.can_grow():
            return None
        try:
            region = self._pool.create(nbytes)
        except OSError as exc:  # /dev/shm full (its sizeLimit) or gone
            raise SharedMemoryFailure(f"cannot create a {nbytes}-byte region: {exc}") from None
        await self._register(region)
        return region

    async def _register(self, region: Region) -> None:
        """Registers a region the pool just made; dropped again if Triton will not have it."""
        try:
            await self.client.register_system_shared_memory(region.name, region.key, region.size,
                                                            client_timeout=self.timeout_s)
        except (InferenceServerException, *_TRANSPORT_ERRORS) as exc:
            self._pool.drop(region)
            if isinstance(exc, InferenceServerException) and SHM_ERROR.search(exc.message() or ""):
                raise SharedMemoryFailure(exc.message()) from None
            error, reconnect = classify_error(exc, self.url, "shared memory registration")
            if reconnect:
                self._reset_client()
            raise error from None
        self._report()

    async def _infer(self, spec: ModelSpec, infer_inputs, outputs, shared: bool = False):
        try:
            return await self.client.infer(spec.name, infer_inputs, outputs=outputs, client_timeout=self.timeout_s)
        except (InferenceServerException, *_TRANSPORT_ERRORS) as exc:
            if shared and isinstance(exc, InferenceServerException) and SHM_ERROR.search(exc.message() or ""):
                if "to hold the results" in (exc.message() or ""):
                    self._output_shapes.pop(self._shape_key_of(spec, infer_inputs), None)
                raise SharedMemoryFailure(exc.message()) from None
            error, reconnect = classify_error(exc, self.url, spec.name)
            if reconnect:
                self._reset_client()
            raise error from None

    @staticmethod
    def _shape_key(spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> tuple:
        # The outputs fetched are part of the key: a call may ask for a subset of them.
        return (spec.name, tuple(t.name for t in spec.outputs), *(tuple(inputs[t.name].shape) for t in spec.inputs))

    @staticmethod
    def _shape_key_of(spec: ModelSpec, infer_inputs) -> tuple:
        return (spec.name, tuple(t.name for t in spec.outputs), *(tuple(item.shape()) for item in infer_inputs))

    def _learn_outputs(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray], values: dict) -> None:
        if self.shared_memory == "off":
            return
        key = self._shape_key(spec, inputs)
        self._output_shapes[key] = [(t.name, values[t.name].dtype, values[t.name].shape) for t in spec.outputs]
        self._output_shapes.move_to_end(key)
        while len(self._output_shapes) > 1024:
            self._output_shapes.popitem(last=False)

    def _count(self, model: str, transport: str) -> None:
        self.counters[f"{transport}_calls"] += 1
        if self._metrics is not None:
            self._metrics.observe_triton_call(model, transport)

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
