"""Diffusion schedulers in numpy, numerically matching diffusers' torch classes (within 1e-4).

Each scheduler follows diffusers' interface: `set_timesteps(n)` fills `timesteps`; the loop feeds
`scale_model_input(x, t)` to the model and `step(model_output, t, x, generator=...)` returns a
`SchedulerOutput(prev_sample, pred_original_sample)`. One instance follows one trajectory.
Noise-drawing steps take one numpy Generator, or one per batch row (see `scheduling_utils.randn`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from .scheduling_ddim import DDIMScheduler
from .scheduling_ddpm import DDPMScheduler
from .scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from .scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from .scheduling_euler_discrete import EulerDiscreteScheduler
from .scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from .scheduling_utils import SchedulerMixin, SchedulerOutput

# The names a request may pick, as a type for the API schemas; a test keeps it equal to SCHEDULERS' keys.
SchedulerName = Literal["ddim", "euler", "euler_ancestral", "dpmpp_2m", "ddpm", "flow_match_euler"]
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddpm": DDPMScheduler,
    "flow_match_euler": FlowMatchEulerDiscreteScheduler,
}
# Flow-matching models (velocity prediction on x = (1 - sigma) x0 + sigma noise) and noise-schedule
# models (betas, epsilon/v/sample prediction) take different samplers; a config's class says which.
FLOW_SCHEDULERS = frozenset({"flow_match_euler"})


def is_flow_matching(config: Mapping[str, Any]) -> bool:
    return str(config.get("_class_name", "")).startswith("FlowMatch")

# Options a name promises, applied over the model's config (which may come from another algorithm).
_PINNED: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
}


def make_scheduler(name: str, config: Mapping[str, Any], **overrides: Any) -> SchedulerMixin:
    """Build scheduler `name` from the model's diffusers scheduler config, like
    `DDIMScheduler.from_config(pipe.scheduler.config)`: the noise schedule (betas, train timesteps,
    prediction_type, steps_offset, spacing...) comes from `config`, keys the class does not take are
    ignored, and options absent from `config` keep the class defaults. `overrides` win over both
    (e.g. use_karras_sigmas=True for "DPM++ 2M Karras")."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; available: {sorted(SCHEDULERS)}")
    if (name in FLOW_SCHEDULERS) != is_flow_matching(config):
        kind = "a flow-matching" if is_flow_matching(config) else "a noise-schedule (beta)"
        raise ValueError(f"scheduler {name!r} cannot sample {kind} model")
    return SCHEDULERS[name].from_config(config, **{**_PINNED.get(name, {}), **overrides})


def supported_schedulers(config: Mapping[str, Any]) -> list[str]:
    """The scheduler names that can be built from a model's config (some options of a config
    have no port here, e.g. a learned variance for DPM-Solver): what a request may pick."""
    names = []
    for name in SCHEDULERS:
        try:
            make_scheduler(name, config)
        except ValueError:
            continue
        names.append(name)
    return names


__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "SchedulerName",
    "SchedulerOutput",
    "is_flow_matching",
    "make_scheduler",
    "supported_schedulers",
]
