"""Adaptive batching merges concurrent single-pass calls and hands each caller its rows."""

import asyncio

import numpy as np
import pytest

from services.errors import BackendUnavailable
from services.runtime.base import InferenceBackend
from services.runtime.batching import AdaptiveBatcher
from services.runtime.repository import ModelSpec, TensorInfo


class Doubler(InferenceBackend):
    """y = 2x, recording the batch size of every execution; fails on a NaN input."""

    name = "fake"

    def __init__(self, max_batch_size=8):
        super().__init__()
        self.spec = ModelSpec("m", "1", max_batch_size, (TensorInfo("x", np.dtype(np.float32), (-1,)),),
                              (TensorInfo("y", np.dtype(np.float32), (-1,)),))
        self.batches = []

    def models(self):
        return {"m": self.spec}

    async def _execute(self, spec, inputs):
        self.batches.append(len(inputs["x"]))
        await asyncio.sleep(0.01)
        if np.isnan(inputs["x"]).any():
            raise RuntimeError("bad input")
        return {"y": inputs["x"] * 2}


def test_concurrent_calls_share_executions_and_get_their_own_rows():
    inner = Doubler()

    async def main():
        batcher = AdaptiveBatcher(inner, {"m"}, max_wait_s=0.05)
        calls = [np.full((1, 3), i, np.float32) for i in range(12)]
        outs = await asyncio.gather(*(batcher.infer("m", {"x": x}) for x in calls))
        await batcher.close()
        return calls, outs

    calls, outs = asyncio.run(main())
    for x, out in zip(calls, outs):
        np.testing.assert_array_equal(out["y"], 2 * x)
    assert sum(inner.batches) == 12 and len(inner.batches) < 12 and max(inner.batches) <= 8


def test_other_shapes_are_not_merged_and_a_failure_stays_with_its_caller():
    inner = Doubler()

    async def main():
        batcher = AdaptiveBatcher(inner, {"m"}, max_wait_s=0.05)
        a = batcher.infer("m", {"x": np.ones((2, 3), np.float32)})
        b = batcher.infer("m", {"x": np.ones((1, 5), np.float32)})
        out_a, out_b = await asyncio.gather(a, b)
        assert out_a["y"].shape == (2, 3) and out_b["y"].shape == (1, 5)
        bad = batcher.infer("m", {"x": np.full((1, 3), np.nan, np.float32)})
        good = batcher.infer("m", {"x": np.ones((1, 3), np.float32)})
        results = await asyncio.gather(bad, good, return_exceptions=True)
        await batcher.close()
        return results

    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError)
    np.testing.assert_array_equal(good["y"], np.full((1, 3), 2, np.float32))
    assert inner.batches[-3:] == [2, 1, 1]  # the shared batch failed, then one by one


def test_an_outage_fails_every_caller_of_the_batch_without_retrying_each():
    class Down(Doubler):
        async def _execute(self, spec, inputs):
            self.batches.append(len(inputs["x"]))
            raise BackendUnavailable("the backend is down")

    inner = Down()

    async def main():
        batcher = AdaptiveBatcher(inner, {"m"}, max_wait_s=0.05)
        calls = [batcher.infer("m", {"x": np.ones((1, 3), np.float32)}) for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, BackendUnavailable) for r in results)
    assert inner.batches == [3]  # one call: retrying each caller would only hit the outage again


def test_unlisted_models_and_zero_wait_pass_straight_through():
    inner = Doubler()

    async def main():
        for batcher in (AdaptiveBatcher(inner, set(), 0.05), AdaptiveBatcher(inner, {"m"}, 0.0)):
            await asyncio.gather(*(batcher.infer("m", {"x": np.ones((1, 2), np.float32)}) for _ in range(3)))

    asyncio.run(main())
    assert inner.batches == [1] * 6


@pytest.mark.parametrize("rows", [8, 9])
def test_a_call_at_or_over_the_limit_runs_alone(rows):
    inner = Doubler(max_batch_size=8)

    async def main():
        batcher = AdaptiveBatcher(inner, {"m"}, 0.05)
        out = await batcher.infer("m", {"x": np.ones((rows, 2), np.float32)})
        assert out["y"].shape == (rows, 2)

    asyncio.run(main())
    assert sum(inner.batches) == rows
