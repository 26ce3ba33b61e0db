"""Short ONNX Runtime calls run on the calling thread, long ones (and a model's first) in a worker."""

import asyncio
import threading

import numpy as np

from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository


def test_short_calls_run_inline_and_long_ones_in_a_thread(repository):
    backend = OnnxRuntimeBackend(ModelRepository(repository), inline_max_s=3600.0)
    name = "cgan_digits"
    spec = backend.models()[name]
    session = backend._sessions[name]
    threads = []
    real_run = session.run

    class Recording:
        def run(self, names, feeds):
            threads.append(threading.get_ident())
            return real_run(names, feeds)

    backend._sessions[name] = Recording()
    feeds = {t.name: np.zeros((2, *t.dims), t.dtype) for t in spec.inputs}

    async def main():
        me = threading.get_ident()
        first = await backend.infer(name, feeds)
        again = await backend.infer(name, feeds)  # measured now, and well under an hour
        assert backend.runs_inline(name, 2)
        backend.inline_max_s = 0.0
        threaded = await backend.infer(name, feeds)
        assert not backend.runs_inline(name, 2)
        for out in (again, threaded):
            np.testing.assert_array_equal(out[spec.outputs[0].name], first[spec.outputs[0].name])
        return me

    me = asyncio.run(main())
    assert threads[0] != me and threads[1] == me and threads[2] != me
