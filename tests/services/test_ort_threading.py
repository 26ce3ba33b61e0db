"""The embedded backend's threading: where calls run, and ONNX Runtime's thread pools."""

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from services.config import Settings
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]


def test_short_calls_run_inline_and_long_ones_in_a_thread(repository):
    backend = OnnxRuntimeBackend(ModelRepository(repository), inline_max_s=3600.0)
    name = "cgan_digits"
    spec = backend.models()[name]
    session = backend._sessions[name]
    threads = []
    real_run = session.run

    class Recording:
        def run(self, names, feeds, run_options=None):
            threads.append(threading.get_ident())
            return real_run(names, feeds, run_options)

    backend._sessions[name] = Recording()
    feeds = {t.name: np.zeros((2, *t.dims), t.dtype) for t in spec.inputs}

    async def main():
        me = threading.get_ident()
        first = await backend.infer(name, feeds)
        again = await backend.infer(name, feeds)  # measured now, and well under an hour
        shape = next(row_shape for model, row_shape in backend._seconds_per_row if model == name)
        assert backend.runs_inline(name, 2, shape)
        backend.inline_max_s = 0.0
        threaded = await backend.infer(name, feeds)
        assert not backend.runs_inline(name, 2, shape)
        for out in (again, threaded):
            np.testing.assert_array_equal(out[spec.outputs[0].name], first[spec.outputs[0].name])
        return me

    me = asyncio.run(main())
    assert threads[0] != me and threads[1] == me and threads[2] != me


# Each in a fresh process: the shared pool is process-wide, and once it exists ONNX Runtime
# opens no session with a pool of its own there (the exporters' and other tests' included).
SAME_OUTPUTS = """
import asyncio, sys
import numpy as np
from services.pipelines.controlnet import zero_residuals
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository

repository, name = sys.argv[1:]
own = OnnxRuntimeBackend(ModelRepository(repository))  # before the shared pool exists
shared = OnnxRuntimeBackend(ModelRepository(repository), shared_threads=True)
spec = shared.models()[name]
rng = np.random.default_rng(0)
feeds = {t.name: rng.standard_normal((3, *[8 if d == -1 else d for d in t.dims])).astype(t.dtype)
         for t in spec.inputs}
feeds.update(zero_residuals(spec, 3, 8, 8))  # a U-Net's ControlNet inputs follow the latent's size
a, b = (asyncio.run(backend.infer(name, feeds)) for backend in (shared, own))
assert set(a) == set(b) == {t.name for t in spec.outputs}, (set(a), set(b))
for k in a:
    np.testing.assert_array_equal(a[k], b[k])
print("same", sorted(a))
"""

REFUSED = """
import sys
import pytest
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository

repository = ModelRepository(sys.argv[1])
with pytest.raises(ValueError, match="per-session pools"):
    OnnxRuntimeBackend(repository, shared_threads=True, allow_spinning=False)
OnnxRuntimeBackend(repository, shared_threads=True)  # the shared pool exists from here on
with pytest.raises(ValueError, match="choice is per process"):
    OnnxRuntimeBackend(repository)
print("refused")
"""

SERVICE_DEFAULT = """
import sys
from services.config import Settings
from services.runtime import create_backend
from services.runtime import onnxruntime_backend

create_backend(Settings(model_repository=sys.argv[1]))
print("pools", onnxruntime_backend._shared_pools)
"""


def run_alone(script: str, *args) -> str:
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("name", ["sd_digits_unet", "cgan_digits"])
def test_shared_and_per_session_pools_give_the_same_outputs(repository, name):
    """The thread pool is a performance setting: it must not change a single output bit."""
    assert run_alone(SAME_OUTPUTS, repository, name).startswith("same")


def test_pool_settings_that_onnxruntime_cannot_honour_are_refused(repository, monkeypatch):
    """Its shared pool always spins, and no per-session pool opens after it: both refused by
    name, by the backend and by the service's settings."""
    assert run_alone(REFUSED, repository).startswith("refused")
    monkeypatch.delenv("GENSERVE_ORT_THREAD_POOL", raising=False)
    monkeypatch.delenv("GENSERVE_BACKEND", raising=False)
    monkeypatch.setenv("GENSERVE_ORT_ALLOW_SPINNING", "0")  # alone: sleeping threads, so per-session pools
    settings = Settings.from_env()
    assert (settings.ort.thread_pool, settings.ort.allow_spinning) == ("per-session", False)
    monkeypatch.setenv("GENSERVE_ORT_THREAD_POOL", "shared")  # both asked for: refused by name
    with pytest.raises(ValueError, match="GENSERVE_ORT_THREAD_POOL=per-session"):
        Settings.from_env()
    monkeypatch.setenv("GENSERVE_BACKEND", "triton")  # ONNX Runtime settings do not apply there
    Settings.from_env()
    monkeypatch.delenv("GENSERVE_BACKEND")
    monkeypatch.setenv("GENSERVE_ORT_THREAD_POOL", "per-session")
    settings = Settings.from_env()
    assert (settings.ort.thread_pool, settings.ort.allow_spinning) == ("per-session", False)
    monkeypatch.setenv("GENSERVE_ORT_THREAD_POOL", "global")
    with pytest.raises(ValueError, match="GENSERVE_ORT_THREAD_POOL must be one of shared, per-session"):
        Settings.from_env()


def test_the_service_runs_the_shared_pool_by_default(repository):
    assert Settings().ort.thread_pool == "shared"
    assert run_alone(SERVICE_DEFAULT, repository).strip() == "pools (0, 0)"


def test_the_engine_runs_a_lone_request_s_calls_on_its_own_thread(repository):
    """Serving one request, the step engine asks for latency first: the embedded backend runs
    its calls on the event loop's thread (after each model's first, which measures it); with
    two requests in flight, every call goes to a worker. Either way the images are the same."""
    from services.engine.engine import DiffusionEngine, EngineConfig
    from services.pipelines.pipeline_stable_diffusion import (
        DiffusionRequest,
        StableDiffusionPipeline,
        discover_stable_diffusion,
    )

    def run(alone_inline_max_s):
        backend = OnnxRuntimeBackend(ModelRepository(repository), alone_inline_max_s=alone_inline_max_s)
        models = discover_stable_diffusion(backend.models())["sd_digits"]
        engine = DiffusionEngine(StableDiffusionPipeline(backend, models), EngineConfig(16, 10**6), start_loop=False)
        calls = []  # (thread, requests in the engine) per U-Net call
        real = backend._sessions[models.unet]

        class Recording:
            def run(self, names, feeds, run_options=None):
                calls.append((threading.get_ident(), len(engine.scheduler.requests)))
                return real.run(names, feeds, run_options)

        backend._sessions[models.unet] = Recording()

        async def main():
            reqs = [DiffusionRequest(prompt="a handwritten digit seven", num_inference_steps=6,
                                     guidance_scale=4.0, seed=s, scheduler="ddim") for s in (1, 2, 3)]
            images = []
            for group in ([reqs[0]], reqs[1:]):  # one alone, then two together
                handles = [engine.submit(r, 60) for r in group]
                while not all(h.status.finished for h in handles):
                    await engine.step()
                images += [h.result.images for h in handles]
            return images, threading.get_ident()

        images, me = asyncio.run(main())
        return images, calls, me

    images, calls, me = run(alone_inline_max_s=3600.0)
    alone = [thread for thread, n in calls if n == 1]
    together = [thread for thread, n in calls if n > 1]
    assert len(alone) >= 6 and len(together) >= 5
    assert alone[0] != me and set(alone[1:]) == {me}  # the model's first call measures it
    assert me not in together
    threaded, calls, me = run(alone_inline_max_s=0.0)  # never inline
    assert me not in [thread for thread, _ in calls]
    for a, b in zip(images, threaded):
        np.testing.assert_array_equal(a, b)
