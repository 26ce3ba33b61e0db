"""The scheduler's order under contention, given a cost table: pure, no model, no timing."""

import math
from types import SimpleNamespace

import pytest

from services.engine.cost_model import CostModel
from services.engine.request import EngineRequest, RequestStatus
from services.engine.scheduler import STRETCH, StepScheduler
from services.pipelines.diffusion import DiffusionRequest

NATIVE = (64, 64)
STEP_S = 0.0088  # one iteration at the best size (8 rows) of this table
TABLE = {1: 0.0021, 2: 0.0036, 4: 0.0052, 8: STEP_S, 16: 0.024}


def scheduler(policy="fair"):
    cost = CostModel(16, native=NATIVE, learn=False)
    cost.seed(NATIVE, TABLE, now=0.0)
    return StepScheduler(16, 10_000, cost=cost, policy=policy)


def running(name, steps=20, done=1, arrival=0.0, deadline=math.inf, tenant="", rows=2):
    r = EngineRequest(DiffusionRequest(prompt=name, num_inference_steps=steps, guidance_scale=5.0,
                                       height=NATIVE[0], width=NATIVE[1]),
                      deadline=deadline, arrival=arrival, tenant=tenant)
    r.status = RequestStatus.RUNNING
    r.trajectory = SimpleNamespace(rows=rows, num_steps=steps, steps_done=done)
    return r


def names(batch):
    return [r.request.prompt for r in batch.requests]


def test_fcfs_runs_the_oldest_to_completion_first():
    s = scheduler("fcfs")
    s.requests = [running(f"old{i}", steps=30, arrival=i) for i in range(4)] + [running("short", steps=5, arrival=9)]
    assert names(s.schedule(now=10)) == ["old0", "old1", "old2", "old3"]  # 8 rows: the best size


def test_fair_lets_a_short_request_pass_longer_older_ones():
    s = scheduler()
    s.requests = [running(f"long{i}", steps=30, arrival=i * 0.01) for i in range(4)] + [
        running("short", steps=5, arrival=0.5)]
    # short: 0.5 + 8 x 4 steps x 8.8 ms = 0.78 s; the long ones: ~0 + 8 x 29 x 8.8 ms = 2.04 s
    assert names(s.schedule(now=1.0))[0] == "short"


def test_aging_puts_a_long_waiting_request_ahead_of_new_short_ones():
    s = scheduler()
    waited = STRETCH * 29 * STEP_S  # long enough that its virtual deadline comes first
    s.requests = [running("long", steps=30, arrival=0.0)] + [
        running(f"short{i}", steps=5, arrival=waited + 0.01) for i in range(6)]
    assert names(s.schedule(now=waited + 0.02))[0] == "long"


def test_first_steps_come_first_up_to_half_the_rows():
    s = scheduler()
    s.requests = [running(f"busy{i}", steps=5, done=2, arrival=0.0) for i in range(4)] + [
        running(f"new{i}", steps=30, done=0, arrival=1.0 + i) for i in range(4)]
    batch = s.schedule(now=5.0)
    assert batch.rows == 8 and names(batch) == ["new0", "new1", "busy0", "busy1"]


def test_a_near_deadline_goes_first():
    s = scheduler()
    s.requests = [running(f"r{i}", steps=10, arrival=0.0) for i in range(4)] + [
        running("due", steps=30, arrival=5.0, deadline=5.3)]  # 29 steps x 8.8 ms = 0.26 s left
    assert names(s.schedule(now=5.01))[0] == "due"


def test_tenants_take_turns_whoever_came_first():
    s = scheduler()
    s.requests = [running(f"a{i}", steps=10, arrival=i * 0.001, tenant="key:a") for i in range(8)] + [
        running("b0", steps=30, arrival=1.0, tenant="key:b")]
    first = names(s.schedule(now=1.0))
    assert "b0" in first and len(first) == 4  # b's one request gets a slot beside a's three
    second = names(s.schedule(now=1.01))
    assert second[0] == "b0"  # b has been served less than a: b picks first
    assert s.served["key:a"] > s.served["key:b"]


def test_one_tenant_alone_keeps_the_work_order():
    s = scheduler()
    s.requests = [running("x", steps=30, tenant="key:a"), running("y", steps=5, arrival=0.1, tenant="key:a")]
    assert names(s.schedule(now=0.2)) == ["y", "x"]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="fair, fcfs"):
        StepScheduler(16, 100, policy="lifo")
