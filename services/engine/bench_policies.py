"""Other serving systems' batching rules on this engine, for bench/bench_goodput.py only.

Not a user setting: the benchmark starts the same service with GENSERVE_BENCH_POLICY set,
so the same model, HTTP path, text encoding and decoding run another system's scheduling
idea and the comparison isolates that idea. Unset (the default, and what every deployment
runs) the engine's own policy (GENSERVE_ENGINE_POLICY) decides.

  serial    one request at a time, in arrival order: a serial queue in front of a
            pipeline (ComfyUI, BentoDiffusion, the Triton Stable Diffusion tutorial)
  request   request-level batching (SGLang's dynamic batching, vLLM-Omni's request mode):
            the requests that one pipeline call could take together (same size, steps,
            strength, guidance scale, scheduler and LoRA adapters) are batched when the
            previous batch ends, and the batch runs to its end: nobody joins it between steps
  matching  step-level batching restricted to matching parameters (vLLM-Omni's and
            SGLang's step modes): requests join and leave between steps, but share a
            U-Net call only when their size, guidance scale, scheduler and LoRA adapters
            match; the order is the engine's own (fair)

The adapters match when a request names the same adapters at the same scales: vLLM-Omni
activates one LoRA request on the whole model per step (`set_active_adapter(lora_request,
lora_scale)`, the scale folded into the weights), so one call serves one adapter set at one
scale: one adapter combination per batch (bench/bench_lora_batching.py).
"""

from __future__ import annotations

import os
from collections.abc import Collection

from services.engine.request import EngineRequest
from services.engine.scheduler import StepBatch, StepScheduler

BENCH_POLICY_ENV = "GENSERVE_BENCH_POLICY"


def guidance(r: EngineRequest) -> float | None:
    """The guidance scale a shared call would apply (None: no classifier-free guidance,
    whatever the value that turned it off)."""
    return r.request.guidance_scale if r.rows_per_image == 2 else None


def adapter_set(r: EngineRequest) -> tuple[tuple[str, float], ...]:
    """The request's LoRA adapters with their scales, in a fixed order (none: empty)."""
    return tuple(sorted((name, float(scale)) for name, scale in r.request.lora))


def step_parameters(r: EngineRequest) -> tuple:
    """What a step-mode server requires to match before two requests share a denoiser call."""
    return r.shape, guidance(r), r.request.scheduler, adapter_set(r)


def pipeline_parameters(r: EngineRequest) -> tuple:
    """What one pipeline call fixes for every prompt in its batch (a request-level server)."""
    from_image = r.request.init_image is not None
    return (*step_parameters(r), r.request.num_inference_steps, r.request.strength if from_image else None)


class SerialScheduler(StepScheduler):
    """One request at a time, oldest first, alone in every U-Net call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "policy": "fcfs"})

    def can_share(self, head: EngineRequest, r: EngineRequest) -> bool:
        return r is head


class RequestBatchScheduler(StepScheduler):
    """Whole requests batched: when the running batch is done, the oldest request and the
    later ones with its pipeline parameters (up to the cost model's best rows) form the next
    batch, which runs to the end; requests that arrive meanwhile wait for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "policy": "fcfs"})
        self.cohort: list[EngineRequest] = []

    def can_share(self, head: EngineRequest, r: EngineRequest) -> bool:
        return pipeline_parameters(r) == pipeline_parameters(head)

    def join_late(self, batch: StepBatch) -> StepBatch:
        return batch  # a batch runs to its end as it began

    def schedule(self, now: float | None = None, ahead: Collection[EngineRequest] = ()) -> StepBatch:
        self.cohort = [r for r in self.cohort if self.runs_next(r, ahead)]
        if not self.cohort:
            self.cohort = super().schedule(now, ahead).requests
        return StepBatch(list(self.cohort), sum(r.started.rows for r in self.cohort))


class MatchingScheduler(StepScheduler):
    """The engine's step-level batching and order, with calls shared only by requests whose
    size, guidance scale, scheduler and adapters match."""

    def can_share(self, head: EngineRequest, r: EngineRequest) -> bool:
        return step_parameters(r) == step_parameters(head)


BENCH_POLICIES: dict[str, type[StepScheduler]] = {
    "serial": SerialScheduler,
    "request": RequestBatchScheduler,
    "matching": MatchingScheduler,
}


def scheduler_class_from_env() -> type[StepScheduler]:
    """The scheduler GENSERVE_BENCH_POLICY names (a benchmark's service), else the engine's."""
    name = os.environ.get(BENCH_POLICY_ENV, "").strip()
    if not name:
        return StepScheduler
    if name not in BENCH_POLICIES:
        raise ValueError(f"{BENCH_POLICY_ENV} must be one of {', '.join(BENCH_POLICIES)} (benchmarks only), "
                         f"got {name!r}")
    return BENCH_POLICIES[name]
