"""Euler steps of a rectified-flow ODE (flow matching: Lipman et al. 2023, arXiv:2210.02747; Liu et
al. 2023, arXiv:2209.03003), a numpy port of diffusers' `FlowMatchEulerDiscreteScheduler`.

x_sigma = (1 - sigma) * x_0 + sigma * noise, the model predicts the velocity v = noise - x_0, and
one step is x_next = x + (sigma_next - sigma) * v. Timesteps are sigma * num_train_timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .scheduling_utils import (
    Generators,
    SchedulerMixin,
    SchedulerOutput,
    StepIndexMixin,
    broadcast_rows,
    check_supported,
    karras_sigmas,
    randn,
)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift mu: linear in the number of image tokens (diffusers'
    `calculate_shift`), from base_shift at base_seq_len to max_shift at max_seq_len."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


class FlowMatchEulerDiscreteScheduler(StepIndexMixin, SchedulerMixin):
    """Takes diffusers' constructor arguments. Supported: shift, use_dynamic_shifting (then
    `set_timesteps` needs `mu`) with time_shift_type exponential/linear, shift_terminal,
    use_karras_sigmas, use_exponential_sigmas, invert_sigmas, stochastic_sampling (its noise
    drawn under the project's determinism rule). Not implemented: use_beta_sigmas (scipy),
    per-token timesteps; they raise ValueError."""

    timesteps: np.ndarray  # set from the constructor on

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        self._register_config(locals())
        name = type(self).__name__
        check_supported(name, "use_beta_sigmas", bool(use_beta_sigmas), [False])
        check_supported(name, "time_shift_type", time_shift_type, ["exponential", "linear"])
        if use_karras_sigmas and use_exponential_sigmas:
            raise ValueError(f"{name}: only one of use_karras_sigmas, use_exponential_sigmas can be used")
        timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = timesteps / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas
        self.sigma_min, self.sigma_max = float(sigmas[-1]), float(sigmas[0])
        self.num_inference_steps: int | None = None

    def time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def set_timesteps(self, num_inference_steps: int | None = None, sigmas: Sequence[float] | None = None,
                      mu: float | None = None) -> None:
        """`sigmas`: a custom schedule before shifting (FLUX passes linspace(1, 1/n, n));
        `mu`: the dynamic shift, required with use_dynamic_shifting."""
        c = self.config
        if c.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is set")
        if sigmas is None:
            if num_inference_steps is None:
                raise TypeError("set_timesteps needs num_inference_steps or sigmas")
            timesteps = np.linspace(self.sigma_max * c.num_train_timesteps, self.sigma_min * c.num_train_timesteps,
                                    num_inference_steps)
            schedule = timesteps / c.num_train_timesteps
        else:
            if num_inference_steps is not None and len(sigmas) != num_inference_steps:
                raise ValueError("sigmas must have num_inference_steps entries")
            schedule = np.array(sigmas).astype(np.float32)
        num_inference_steps = len(schedule)
        self.num_inference_steps = num_inference_steps

        if c.use_dynamic_shifting and mu is not None:  # mu was checked above: set whenever shifting is dynamic
            schedule = self.time_shift(mu, 1.0, schedule)
        else:
            schedule = c.shift * schedule / (1 + (c.shift - 1) * schedule)
        if c.shift_terminal:
            one_minus = 1 - schedule
            schedule = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        if c.use_karras_sigmas:
            schedule = karras_sigmas(float(schedule[-1]), float(schedule[0]), num_inference_steps)
        elif c.use_exponential_sigmas:
            schedule = np.exp(np.linspace(math.log(float(schedule[0])), math.log(float(schedule[-1])),
                                          num_inference_steps))
        schedule = np.asarray(schedule).astype(np.float32)
        timesteps = schedule * np.float32(c.num_train_timesteps)
        if c.invert_sigmas:
            schedule = 1.0 - schedule
            timesteps = schedule * np.float32(c.num_train_timesteps)
            schedule = np.concatenate([schedule, np.ones(1, np.float32)])
        else:
            schedule = np.concatenate([schedule, np.zeros(1, np.float32)])
        self.timesteps, self.sigmas = timesteps.astype(np.float32), schedule.astype(np.float32)
        self._reset_step_index()

    def scale_noise(self, sample: np.ndarray, timestep, noise: np.ndarray) -> np.ndarray:
        """The forward process at `timestep`: sigma * noise + (1 - sigma) * sample."""
        idx = self._noise_indices(np.asarray(timestep).reshape(-1))
        sigma = broadcast_rows(self.sigmas[idx], sample.ndim).astype(sample.dtype)
        return sigma * noise + (1.0 - sigma) * sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """The generic pipeline's name for the forward process (image-to-image, inpainting)."""
        return self.scale_noise(original_samples, timesteps, noise)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray,
             generator: Generators = None) -> SchedulerOutput:
        i = self._current_step_index(timestep)
        sample = sample.astype(np.float32)
        sigma = float(self.sigmas[i])
        sigma_next = float(self.sigmas[i + 1])
        x0 = sample - np.float32(sigma) * model_output
        if self.config.stochastic_sampling:
            noise = randn(sample.shape, generator)
            prev_sample = np.float32(1.0 - sigma_next) * x0 + np.float32(sigma_next) * noise
        else:
            prev_sample = sample + (self.sigmas[i + 1] - self.sigmas[i]) * model_output
        self._step_index = i + 1
        return SchedulerOutput(prev_sample.astype(model_output.dtype), x0)
