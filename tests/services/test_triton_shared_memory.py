"""Tensors to a same-host Triton through system shared memory (services.runtime.triton_backend):
negotiated at start-up against a real tritonserver, the same bits as the socket path, one
region per concurrent call and none allocated per call, the fallbacks (Triton cannot open
the regions at start-up, a region unknown to Triton mid-run, shared memory lost for good),
`required` failing loudly, and nothing left behind after close."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from services.config import Settings
from services.errors import BackendUnavailable
from services.pipelines.controlnet import zero_residuals
from services.runtime.repository import ModelRepository
from services.runtime.triton_backend import TritonBackend
from services.runtime.triton_shm import SHM_DIR
from tests.fixtures.local_server import LocalServer, free_port

pytestmark = pytest.mark.server

UNET = "sd_digits_unet"
OUT = ["noise_pred"]


def unet_inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    """Random U-Net inputs, and zero ControlNet residuals where the U-Net takes them."""
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((rows, 4, 8, 8), dtype=np.float32),
            "timestep": rng.uniform(0, 999, (rows, 1)).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((rows, 16, 64), dtype=np.float32),
            **zero_residuals(_unet[0], rows, 8, 8)}


_unet: list = []  # the U-Net's ModelSpec, set by `specs` (every test that calls unet_inputs takes it)


@pytest.fixture(scope="module")
def specs(repository):
    models = ModelRepository(repository)
    _unet[:] = [models[UNET]]
    return models


@pytest.fixture(scope="module")
def url(triton):
    return f"127.0.0.1:{triton.grpc_port}"


def registered(triton) -> dict:
    client = triton.grpc()
    try:
        return client.get_system_shared_memory_status(as_json=True).get("regions", {})
    finally:
        client.close()


def own(backend: TritonBackend, regions: dict) -> set[str]:
    return {name for name in regions if name.startswith(backend._pool.prefix)}


def forget_regions(triton, backend: TritonBackend) -> None:
    """Unregisters every region of `backend` behind its back: what a Triton restart does to it."""
    client = triton.grpc()
    try:
        for name in own(backend, registered(triton)):
            client.unregister_system_shared_memory(name)
    finally:
        client.close()


def run(coro):
    return asyncio.run(coro)


async def both(shared: TritonBackend, socket: TritonBackend, model: str, inputs: dict):
    return await shared.infer(model, inputs), await socket.infer(model, inputs)


def test_shared_memory_is_negotiated_used_and_equals_the_socket_bit_for_bit(specs, url, triton):
    async def scenario():
        shared = TritonBackend(specs, url, shared_memory="auto")
        socket = TritonBackend(specs, url, shared_memory="off")
        assert shared.transport == "shared_memory", shared.transport_reason
        assert socket.transport == "socket"
        try:
            # Rows 1..16 as the step engine sends them; each new shape's outputs come by
            # socket once, later calls of that shape write them into the region.
            for rows in (2, 2, 1, 7, 16, 16):
                inputs = unet_inputs(rows, seed=rows)
                got, want = await both(shared, socket, UNET, inputs)
                assert got["noise_pred"].shape == (rows, 4, 8, 8)
                assert np.array_equal(got["noise_pred"], want["noise_pred"])
            # Another model with other dtypes (int64 token ids in, floats out).
            tokens = {"input_ids": np.arange(2 * 16, dtype=np.int64).reshape(2, 16) % 50}
            for _ in range(2):
                got, want = await both(shared, socket, "sd_digits_text_encoder", tokens)
                for name in want:
                    assert np.array_equal(got[name], want[name])
            status = shared.shared_memory_status()
            assert status["shared_memory_calls"] == 8 and status["socket_calls"] == 0
            # Triton holds the regions this process registered, under their /dev/shm keys.
            regions = registered(triton)
            mine = own(shared, regions)
            assert len(mine) == status["regions"] >= 1
            assert all((SHM_DIR / regions[name]["key"].lstrip("/")).exists() for name in mine)
            # Per-call reuse: the same calls again allocate nothing.
            allocations = status["region_allocations"]
            for rows in (2, 1, 7, 16):
                await shared.infer(UNET, unet_inputs(rows, seed=100 + rows))
            assert shared.shared_memory_status()["region_allocations"] == allocations
        finally:
            await shared.close()
            await socket.close()
        return shared

    shared = run(scenario())
    assert not own(shared, registered(triton)), "close() left regions registered in Triton"
    assert not list(SHM_DIR.glob(shared._pool.prefix + "*")), "close() left files in /dev/shm"


def test_concurrent_calls_each_get_their_own_region(specs, url):
    async def scenario():
        # noise_pred alone, as the engine asks (the deep features are fetched only for DeepCache).
        shared = TritonBackend(specs, url, shared_memory="auto")
        socket = TritonBackend(specs, url, shared_memory="off")
        try:
            batches = [unet_inputs(1 + i % 4, seed=i) for i in range(12)]
            for inputs in batches[:4]:  # learn the output shapes (rows 1..4)
                await shared.infer(UNET, inputs, OUT)
            got = await asyncio.gather(*(shared.infer(UNET, x, OUT) for x in batches))
            for inputs, out in zip(batches, got):
                want = await socket.infer(UNET, inputs, OUT)
                assert np.array_equal(out["noise_pred"], want["noise_pred"])
            status = shared.shared_memory_status()
            assert status["shared_memory_calls"] == 16
            assert 1 < status["regions"] <= 12  # calls in flight together never share one
            allocations = status["region_allocations"]
            await asyncio.gather(*(shared.infer(UNET, x, OUT) for x in batches))
            assert shared.shared_memory_status()["region_allocations"] == allocations
        finally:
            await shared.close()
            await socket.close()

    run(scenario())


def test_start_up_falls_back_to_the_socket_when_triton_cannot_open_the_regions(specs, url, triton, tmp_path):
    """A directory Triton does not see stands for another host, or a container without
    the shared /dev/shm: Triton's shm_open of the probe's key fails, for real."""
    async def scenario():
        backend = TritonBackend(specs, url, shared_memory="auto", shm_dir=tmp_path)
        socket = TritonBackend(specs, url, shared_memory="off")
        try:
            assert backend.transport == "socket"
            assert "Unable to open shared memory region" in backend.transport_reason
            inputs = unet_inputs(2, seed=5)
            got, want = await both(backend, socket, UNET, inputs)
            assert np.array_equal(got["noise_pred"], want["noise_pred"])
            status = backend.shared_memory_status()
            assert status["fallbacks"] == 1 and status["socket_calls"] == 1 and status["regions"] == 0
        finally:
            await backend.close()
            await socket.close()

    run(scenario())
    assert not list(tmp_path.iterdir()), "the probe region was left behind"


def test_required_fails_loudly_at_start_up(specs, url, tmp_path):
    with pytest.raises(RuntimeError, match=r"GENSERVE_TRITON_SHARED_MEMORY=required.*Unable to open"):
        TritonBackend(specs, url, shared_memory="required", shm_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"required.*not reachable"):
        TritonBackend(specs, f"127.0.0.1:{free_port()}", timeout_s=1, shared_memory="required")


def test_a_region_triton_forgot_is_registered_again_mid_run(specs, url, triton):
    """What a Triton restart does to registrations, without the restart: every region of
    this process unregistered behind its back. The next call re-negotiates and succeeds
    through shared memory."""
    async def scenario():
        shared = TritonBackend(specs, url, shared_memory="auto")
        socket = TritonBackend(specs, url, shared_memory="off")
        try:
            inputs = unet_inputs(2, seed=9)
            for _ in range(2):  # the shape's outputs learnt, then its region sized to hold them too
                await shared.infer(UNET, inputs)
            forget_regions(triton, shared)
            got, want = await both(shared, socket, UNET, inputs)
            assert np.array_equal(got["noise_pred"], want["noise_pred"])
            status = shared.shared_memory_status()
            assert status["transport"] == "shared_memory" and status["recoveries"] == 1
            assert status["shared_memory_calls"] == 3 and status["socket_calls"] == 0
            assert own(shared, registered(triton))
        finally:
            await shared.close()
            await socket.close()

    run(scenario())


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_shared_memory_lost_for_good_mid_run(specs, url, triton, tmp_path, mode):
    """Regions gone from Triton and new ones it cannot open (the shared mount went away):
    `auto` finishes the call over the socket, `required` answers unavailable (503)."""
    async def scenario():
        shared = TritonBackend(specs, url, shared_memory=mode)
        socket = TritonBackend(specs, url, shared_memory="off")
        try:
            inputs = unet_inputs(3, seed=11)
            await shared.infer(UNET, inputs)
            forget_regions(triton, shared)
            shared._pool.directory = tmp_path  # from now on, regions Triton cannot open
            if mode == "required":
                with pytest.raises(BackendUnavailable, match="shared memory"):
                    await shared.infer(UNET, inputs)
                assert not await shared.is_ready()
            else:
                got, want = await both(shared, socket, UNET, inputs)
                assert np.array_equal(got["noise_pred"], want["noise_pred"])
                status = shared.shared_memory_status()
                assert status["transport"] == "socket" and status["fallbacks"] == 1
                assert status["socket_calls"] == 1
                assert await shared.is_ready()
        finally:
            await shared.close()
            await socket.close()

    run(scenario())


def test_the_setting(monkeypatch):
    monkeypatch.setenv("GENSERVE_TRITON_SHARED_MEMORY", "Required")
    assert Settings.from_env().triton.shared_memory == "required"
    monkeypatch.delenv("GENSERVE_TRITON_SHARED_MEMORY")
    assert Settings.from_env().triton.shared_memory == "auto"
    monkeypatch.setenv("GENSERVE_TRITON_SHARED_MEMORY", "sometimes")
    with pytest.raises(ValueError, match="GENSERVE_TRITON_SHARED_MEMORY must be one of auto, off, required"):
        Settings.from_env()


def test_a_service_with_required_and_no_triton_does_not_start(repository, tmp_path):
    """The worker's start-up raises, naming the setting (BentoML restarts the worker, which
    raises again): the service never reports ready."""
    server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_BACKEND": "triton",
                          "GENSERVE_TRITON_URL": f"127.0.0.1:{free_port()}", "GENSERVE_TRITON_TIMEOUT_S": "1",
                          "GENSERVE_TRITON_SHARED_MEMORY": "required"}, tmp_path / "bentoml.log")
    try:
        deadline = time.monotonic() + 60
        while "RuntimeError: GENSERVE_TRITON_SHARED_MEMORY=required" not in server.logs():
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.3)
        try:
            ready = httpx.get(f"{server.url}/readyz", timeout=5).status_code
        except httpx.HTTPError:
            ready = None  # not even listening
        assert ready != 200
    finally:
        server.stop()


def test_regions_of_a_process_that_died_are_swept_at_the_next_start(specs, url, triton):
    """A service killed without close() leaves its files in /dev/shm and its regions
    registered in Triton; the next service on this host removes both (and only those)."""
    from services.runtime.triton_shm import Region, region_prefix

    dead = Region.create(SHM_DIR, f"{region_prefix()}999999999.1-abcdef-deadbeef0000", 4096)  # no such pid
    client = triton.grpc()
    try:
        client.register_system_shared_memory(dead.name, dead.key, dead.size)
        dead.mm.close()  # the "dead" process's mapping; the file stays, as after a SIGKILL
        backend = TritonBackend(specs, url, shared_memory="auto")
        try:
            assert backend.transport == "shared_memory"
            assert dead.name not in registered(triton)
            assert not dead.path.exists()
        finally:
            run(backend.close())
    finally:
        client.unregister_system_shared_memory(dead.name)
        dead.path.unlink(missing_ok=True)
        client.close()
