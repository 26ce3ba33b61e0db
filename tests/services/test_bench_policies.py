"""Batching rules, given running requests: which of them share a U-Net call. The benchmark's
stand-ins for other servers' rules, the engine's own, and both planning the next call while one
is in flight (the overlapped engine). Pure scheduler, no model, no timing."""

from types import SimpleNamespace

import numpy as np
import pytest

from services.engine.bench_policies import (
    BENCH_POLICY_ENV,
    MatchingScheduler,
    RequestBatchScheduler,
    SerialScheduler,
    scheduler_class_from_env,
)
from services.engine.cost_model import CostModel
from services.engine.request import EngineRequest, RequestStatus
from services.engine.scheduler import StepBatch, StepScheduler
from services.pipelines.diffusion import DiffusionRequest

NATIVE = (32, 32)


def make(cls):
    return cls(32, 10_000, cost=CostModel(32, native=NATIVE, learn=False))  # as many rows as fit


def running(name, steps=20, guidance=5.0, scheduler="ddim", size=NATIVE, arrival=0.0, done=1, image=False,
            strength=0.8, lora=()):
    r = EngineRequest(DiffusionRequest(prompt=name, num_inference_steps=steps, guidance_scale=guidance,
                                       scheduler=scheduler, height=size[0], width=size[1], strength=strength,
                                       init_image=np.zeros((3, *size), np.float32) if image else None,
                                       lora=list(lora)),
                      deadline=float("inf"), arrival=arrival)
    r.status = RequestStatus.RUNNING
    rows = 2 if guidance > 1 else 1
    r.trajectory = SimpleNamespace(rows=rows, num_steps=steps, steps_done=done)
    return r


def names(batch):
    return [r.request.prompt for r in batch.requests]


def mixed():
    """Oldest first: two that match 'a' in every way, then one difference each."""
    return [running("a"), running("a-same", steps=30, arrival=1), running("a-steps", steps=12, arrival=2),
            running("guidance-7", guidance=7.0, arrival=3), running("euler", scheduler="euler", arrival=4),
            running("48px", size=(48, 48), arrival=5), running("unguided", guidance=1.0, arrival=6),
            running("unguided-0", guidance=0.0, arrival=7)]


def test_the_engine_shares_a_call_across_steps_guidance_and_schedulers_of_one_size():
    s = make(StepScheduler)
    s.requests = mixed()
    assert set(names(s.schedule(now=10))) == {"a", "a-same", "a-steps", "guidance-7", "euler", "unguided",
                                              "unguided-0"}


def test_matching_shares_a_call_only_when_size_guidance_and_scheduler_match():
    s = make(MatchingScheduler)
    s.requests = mixed()
    assert set(names(s.schedule(now=10))) == {"a", "a-same", "a-steps"}  # step counts may differ


def test_matching_treats_every_guidance_that_turns_guidance_off_as_one():
    s = make(MatchingScheduler)
    s.requests = [running("unguided", guidance=1.0), running("unguided-0", guidance=0.0, arrival=1),
                  running("guided", arrival=2)]
    assert names(s.schedule(now=10)) == ["unguided", "unguided-0"]


def adapter_mix():
    """Oldest first: 'a' with two adapters, the same pair in the other order, then one difference each."""
    return [running("a", lora=[("x", 0.8), ("y", 1.0)]),
            running("a-reordered", lora=[("y", 1.0), ("x", 0.8)], arrival=1),
            running("x-only", lora=[("x", 0.8)], arrival=2),
            running("x-weaker", lora=[("x", 0.5), ("y", 1.0)], arrival=3),
            running("none", arrival=4)]


def test_the_engine_shares_a_call_across_adapter_sets():
    s = make(StepScheduler)
    s.requests = adapter_mix()
    assert set(names(s.schedule(now=10))) == {"a", "a-reordered", "x-only", "x-weaker", "none"}


def test_matching_shares_a_call_only_between_the_same_adapters_at_the_same_scales():
    s = make(MatchingScheduler)
    s.requests = adapter_mix()
    assert names(s.schedule(now=10)) == ["a", "a-reordered"]  # the order a request names them in does not matter


def test_request_batching_needs_the_same_adapters_too():
    s = make(RequestBatchScheduler)
    s.requests = [running("none"), running("x", lora=[("x", 1.0)], arrival=1), running("none-twin", arrival=2)]
    assert names(s.schedule(now=10)) == ["none", "none-twin"]


def test_serial_runs_the_oldest_request_alone_until_it_is_done():
    s = make(SerialScheduler)
    s.requests = [running("first", arrival=0), running("second", arrival=1), running("third", arrival=2)]
    assert names(s.schedule(now=10)) == ["first"]
    s.requests[0].status = RequestStatus.FINISHED_DONE
    s.prune()
    assert names(s.schedule(now=10)) == ["second"]


def test_request_batching_needs_every_pipeline_parameter_to_match():
    s = make(RequestBatchScheduler)
    s.requests = [*mixed(), running("a-twin", arrival=8), running("a-img2img", image=True, arrival=9)]
    assert names(s.schedule(now=10)) == ["a", "a-twin"]  # steps, and text vs image input, must match too


def test_img2img_requests_batch_together_only_at_one_strength():
    s = make(RequestBatchScheduler)
    s.requests = [running("i", image=True), running("i-same", image=True, arrival=1),
                  running("i-weaker", image=True, strength=0.5, arrival=2)]
    assert names(s.schedule(now=10)) == ["i", "i-same"]


def test_a_request_batch_runs_to_its_end_before_anyone_joins():
    s = make(RequestBatchScheduler)
    s.requests = [running("a"), running("b", arrival=1), running("other", steps=30, arrival=2)]
    assert names(s.schedule(now=10)) == ["a", "b"]
    s.requests.append(running("late-twin", arrival=3))  # would match a and b
    assert names(s.schedule(now=10)) == ["a", "b"]
    for r in s.requests[:2]:
        r.status = RequestStatus.DECODING
    assert names(s.schedule(now=10)) == ["other"]  # the oldest waiting forms the next batch
    s.requests[2].status = RequestStatus.DECODING
    assert names(s.schedule(now=10)) == ["late-twin"]


def test_a_cancelled_member_leaves_the_request_batch_and_the_rest_goes_on():
    s = make(RequestBatchScheduler)
    s.requests = [running("a"), running("b", arrival=1), running("c", arrival=2)]
    assert names(s.schedule(now=10)) == ["a", "b", "c"]
    s.requests[1].finish(RequestStatus.FINISHED_CANCELLED)
    s.prune()
    batch = s.schedule(now=10)
    assert names(batch) == ["a", "c"] and batch.rows == 4


def test_the_policy_comes_from_the_bench_variable_and_a_typo_is_refused(monkeypatch):
    monkeypatch.delenv(BENCH_POLICY_ENV, raising=False)
    assert scheduler_class_from_env() is StepScheduler
    monkeypatch.setenv(BENCH_POLICY_ENV, "matching")
    assert scheduler_class_from_env() is MatchingScheduler
    monkeypatch.setenv(BENCH_POLICY_ENV, "serail")
    with pytest.raises(ValueError, match=BENCH_POLICY_ENV):
        scheduler_class_from_env()


# -- planning the next call while one runs (the overlapped engine: schedule(ahead=...)) ---------
def test_planned_ahead_a_request_whose_last_step_is_in_flight_is_left_out():
    s = make(StepScheduler)
    last, more, idle = running("last", steps=5, done=4), running("more", steps=5, done=3, arrival=1), running(
        "idle", steps=9, done=2, arrival=2)
    s.requests = [last, more, idle]
    assert set(names(s.schedule(now=10, ahead={last, more}))) == {"more", "idle"}
    assert set(names(s.schedule(now=10))) == {"last", "more", "idle"}  # nothing in flight: all of them


def test_planned_ahead_a_first_step_in_flight_no_longer_counts_as_a_first_step():
    """At most half the rows go to first steps: a request whose first step is in flight takes
    its second in the next call, so it does not use that share."""
    s = StepScheduler(4, 10_000, cost=CostModel(4, native=NATIVE, learn=False))  # 4 rows: 2 for first steps
    old = running("old", done=5, arrival=5)
    fresh = [running(f"fresh-{i}", done=0, arrival=i) for i in range(2)]
    s.requests = [old, *fresh]
    assert names(s.schedule(now=10)) == ["fresh-0", "old"]  # fresh-1 waits: the first-step share is full
    assert names(s.schedule(now=10, ahead={fresh[0], fresh[1]})) == ["fresh-0", "fresh-1"]


def test_planned_ahead_a_request_batch_ends_when_its_last_step_is_in_flight():
    s = make(RequestBatchScheduler)
    a, b, other = running("a", steps=5, done=4), running("b", steps=5, done=4, arrival=1), running(
        "other", steps=30, arrival=2)
    s.requests = [a, b, other]
    assert names(s.schedule(now=10)) == ["a", "b"]
    assert names(s.schedule(now=10, ahead={a, b})) == ["other"]  # the next batch, planned during a and b's last


def test_a_planned_batch_is_topped_up_with_first_steps_that_may_share_it():
    """Requests admitted after the plan join it at launch, under each policy's sharing rule;
    a request-level batch is never joined."""
    def planned(*reqs):
        return StepBatch(list(reqs), sum(r.started.rows for r in reqs))

    for cls, joined in ((StepScheduler, {"a", "fresh-euler", "fresh"}), (MatchingScheduler, {"a", "fresh"}),
                        (RequestBatchScheduler, {"a"}), (SerialScheduler, {"a"})):
        s = make(cls)
        a = running("a", done=3)
        s.requests = [a, running("fresh", done=0, arrival=1), running("fresh-euler", scheduler="euler", done=0,
                                                                       arrival=2),
                      running("started", done=2, arrival=3), running("48px", size=(48, 48), done=0, arrival=4)]
        assert set(names(s.join_late(planned(a)))) == joined, cls.__name__
    s = StepScheduler(3, 10_000, cost=CostModel(3, native=NATIVE, learn=False))  # room for one guided row pair
    a = running("a", guidance=1.0, done=3)
    s.requests = [a, running("fresh", done=0, arrival=1), running("fresh-unguided", guidance=1.0, done=0, arrival=2)]
    assert names(s.join_late(planned(a))) == ["a", "fresh"]  # 1 + 2 rows fill 3; the next would not fit
