"""Nothing outlives the processes that made it: a stopped Triton-backed service leaves no
shared-memory region in /dev/shm, and the Python-backend stubs of a Triton killed with
SIGKILL exit (removing their own regions) instead of holding memory forever."""

import os
import signal
import time

import httpx
import psutil
import pytest

from services.runtime.triton_shm import SHM_DIR, region_prefix
from tests.conftest import running_server
from tests.fixtures.triton import start_triton

pytestmark = [pytest.mark.server, pytest.mark.slow]

STUB = "triton_python_backend_stub"


def stubs(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if STUB in " ".join(p.cmdline())]


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_nothing_is_left_after_the_service_stops_and_triton_is_killed(repository, tmp_path):
    triton = start_triton(repository, tmp_path / "triton")
    try:
        env = {"GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_BACKEND": "triton",
               "GENSERVE_TRITON_URL": f"127.0.0.1:{triton.grpc_port}", "GENSERVE_TRITON_SHARED_MEMORY": "required"}
        service = running_server(env, tmp_path)
        server = next(service)
        workers = [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]
        r = httpx.post(f"{server.url}/v1/gan/generate", json={"seed": 1, "num_images": 2}, timeout=60)
        assert r.status_code == 200, r.text
        prefixes = [f"{region_prefix()}{pid}." for pid in workers]
        made = [p.name for p in SHM_DIR.iterdir() if p.name.startswith(tuple(prefixes))]
        assert made, "the service used no shared-memory region"
        next(service, None)  # stops it (SIGTERM)
        left = [p.name for p in SHM_DIR.iterdir() if p.name.startswith(tuple(prefixes))]
        assert not left, f"the stopped service left {left} in {SHM_DIR}"

        children = stubs(triton.proc.pid)
        assert children, "no Python-backend stub under tritonserver"
        regions = {a for p in children for a in p.cmdline()[1:] if a.startswith("/") and (SHM_DIR / a[1:]).exists()}
        os.kill(triton.proc.pid, signal.SIGKILL)  # the server alone, as an OOM kill would
        triton.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in children), "Python-backend stubs outlived tritonserver"
        assert not [r for r in regions if (SHM_DIR / r[1:]).exists()], "the stubs' regions were left in /dev/shm"
    finally:
        triton.kill()
