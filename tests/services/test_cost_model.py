"""The cost model and the scheduler's choices given a cost table: pure, no model, no timing."""

import math
from types import SimpleNamespace

import pytest

from services.engine import cost_model as cm
from services.engine.cost_model import CostModel, row_ladder
from services.engine.request import EngineRequest, RequestStatus
from services.engine.scheduler import QueueFull, StepScheduler
from services.pipelines.diffusion import DiffusionRequest

NATIVE = (64, 64)
# A CPU-like curve: per-row cost falls to 8 rows, then rises again (ms per call by rows).
CPU = {1: 2.1, 2: 3.6, 4: 5.2, 8: 8.8, 16: 24.0}
# A GPU-like curve: flat far longer.
GPU = {1: 10.0, 2: 10.1, 4: 10.2, 8: 10.5, 16: 11.0, 32: 13.0, 64: 30.0}


def model(table, max_rows=16, budget_s=0.0):
    m = CostModel(max_rows, budget_s, native=NATIVE)
    m.seed(NATIVE, {n: ms / 1000 for n, ms in table.items()}, now=0.0)
    return m


def running(rows_per_image=2, images=1, steps=20, done=0, shape=NATIVE, arrival=0.0):
    r = EngineRequest(DiffusionRequest(prompt="x", num_images=images, num_inference_steps=steps,
                                       guidance_scale=5.0 if rows_per_image == 2 else 1.0,
                                       height=shape[0], width=shape[1]), deadline=math.inf, arrival=arrival)
    r.status = RequestStatus.RUNNING
    r.trajectory = SimpleNamespace(rows=rows_per_image * images, num_steps=steps, steps_done=done)
    return r


def test_the_ladder_is_powers_of_two_and_the_max():
    assert row_ladder(16) == [1, 2, 4, 8, 16]
    assert row_ladder(12) == [1, 2, 4, 8, 12]
    assert row_ladder(1) == [1]


def test_best_rows_is_where_rows_per_second_peaks():
    assert model(CPU).best_rows(NATIVE) == 8  # 8 / 8.8 ms beats 16 / 24 ms
    assert model(GPU, max_rows=64).best_rows(NATIVE) == 32  # flat until it bends
    assert model(GPU, max_rows=16).best_rows(NATIVE) == 16  # never past the model's max
    assert model(CPU).best_rows(NATIVE, limit=4) == 4


def test_a_latency_budget_caps_the_rows():
    assert model(GPU, max_rows=64, budget_s=0.012).best_rows(NATIVE) == 16
    assert model(CPU, budget_s=0.001).best_rows(NATIVE) == 1  # nothing fits: the smallest


def test_near_ties_go_to_the_smaller_batch():
    flat = {1: 1.0, 2: 1.5, 4: 1.99, 8: 4.0}  # 4 rows: 2.01 rows/ms, 8 rows: 2.0 (within 2%)
    assert model(flat, max_rows=8).best_rows(NATIVE) == 4


def test_latency_interpolates_and_extrapolates():
    m = model(CPU)
    assert m.latency(NATIVE, 6) == pytest.approx((5.2 + (8.8 - 5.2) / 2) / 1000)
    assert m.latency(NATIVE, 32) == pytest.approx(24.0 / 16 * 32 / 1000)
    assert m.latency((128, 64), 8) == pytest.approx(2 * 8.8 / 1000)  # unmeasured bucket: by area
    assert m.latency((None, None), 8) == pytest.approx(8.8 / 1000)  # the model's own size
    assert CostModel(16).latency(NATIVE, 4) is None


def test_unmeasured_sizes_past_the_largest_seen_are_presumed_no_worse():
    m = CostModel(16, native=NATIVE)
    assert m.best_rows(NATIVE) == 16  # nothing known: as many as fit
    m.observe(NATIVE, 2, 0.004)  # only small calls seen so far
    assert m.best_rows(NATIVE) == 16
    assert CostModel(16, latency_budget_s=0.01, native=NATIVE).best_rows(NATIVE) == 16
    m = CostModel(16, latency_budget_s=0.010, native=NATIVE)
    m.observe(NATIVE, 2, 0.004)
    assert m.best_rows(NATIVE) == 5  # 2 ms per row extrapolated, 10 ms budget


def test_live_timings_move_the_choice():
    m = model(CPU)
    for _ in range(60):  # the machine got quieter at 16 rows: 0.4 ms per row
        m.observe(NATIVE, 16, 0.0064)
    assert m.best_rows(NATIVE) == 16


def test_exploration_retimes_the_stalest_size_now_and_then(monkeypatch):
    monkeypatch.setattr(cm, "EXPLORE_EVERY", 4)
    m = model(CPU)
    m.observe(NATIVE, 1, 0.0021, now=5.0)
    m.observe(NATIVE, 2, 0.0036, now=5.0)
    m.observe(NATIVE, 4, 0.0052, now=5.0)
    choices = [m.target_rows(NATIVE, waiting_rows=32) for _ in range(8)]
    assert choices == [8, 8, 8, 16, 8, 8, 8, 16]  # 16 is the stalest entry
    assert m.target_rows(NATIVE, waiting_rows=6) == 8  # no more than the best waiting: no exploring


def test_the_scheduler_fills_to_the_best_size_not_to_the_max():
    s = StepScheduler(max_batch_rows=16, max_queued_image_steps=10_000, cost=model(CPU))
    reqs = [running(arrival=i, done=1) for i in range(8)]  # 16 rows waiting, 2 each
    s.requests = list(reqs)
    batch = s.schedule()
    assert batch.rows == 8 and batch.requests == reqs[:4]


def test_the_scheduler_runs_everything_before_anything_is_measured():
    s = StepScheduler(max_batch_rows=16, max_queued_image_steps=10_000)
    s.requests = [running(arrival=i, done=1) for i in range(8)]
    assert s.schedule().rows == 16


def test_retry_after_is_the_queue_priced_by_the_cost_model():
    s = StepScheduler(max_batch_rows=16, max_queued_image_steps=400, cost=model(CPU))
    s.add_request(running(rows_per_image=2, images=8, steps=50))  # 400 image-steps, 800 row-steps
    # 800 rows at 8.8 / 8 ms per row = 0.88 s to drain; a 100-image-step excess is a quarter of it.
    assert s.queue_seconds() == pytest.approx(800 * 8.8 / 8 / 1000)
    with pytest.raises(QueueFull) as info:
        s.add_request(running(images=2, steps=50))
    assert info.value.retry_after_s == 1
    slow = StepScheduler(max_batch_rows=16, max_queued_image_steps=400,
                         cost=model({n: 100 * ms for n, ms in CPU.items()}))
    slow.add_request(running(images=8, steps=50))
    with pytest.raises(QueueFull) as info:
        slow.add_request(running(images=2, steps=50))
    assert info.value.retry_after_s == math.ceil(800 * 880 / 8 / 1000 / 4)  # 22 s


def test_the_queue_can_be_bounded_by_its_drain_time():
    s = StepScheduler(max_batch_rows=16, max_queued_image_steps=10_000, cost=model(CPU), max_queue_seconds=1.0)
    s.add_request(running(images=8, steps=50))  # 0.88 s
    s.add_request(running(images=1, steps=20))  # + 0.044 s
    with pytest.raises(QueueFull) as info:
        s.add_request(running(images=4, steps=50))  # + 0.44 s: past 1 s
    assert "0.9s of denoising work" in str(info.value) and info.value.retry_after_s == 1


def test_describe_reports_the_table_and_the_choice():
    d = model(CPU).describe()
    assert d["measured"] and d["best_rows"] == 8 and d["ms_per_call"]["16"] == 24.0
    assert d["ms_per_row_at_best"] == pytest.approx(1.1) and d["rows_per_second"] == pytest.approx(909.1)
    assert CostModel(16).describe()["measured"] is False
