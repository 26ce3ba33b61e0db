"""Euler ancestral sampling (Crowson's k-diffusion `sample_euler_ancestral`: the Euler step of Karras et al.
2022, arXiv:2206.00364, followed by fresh noise as in ancestral DDPM sampling), a numpy port of diffusers'
`EulerAncestralDiscreteScheduler`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .scheduling_euler_discrete import EulerDiscreteScheduler
from .scheduling_utils import Generators, SchedulerOutput, randn


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler step down to sigma_down, then fresh noise back up to sigma_next.

    Same sigma schedule as `EulerDiscreteScheduler` with linear interpolation (its other options
    stay at their defaults and appear in `config`). Takes diffusers' constructor arguments;
    prediction_type epsilon or v_prediction.
    """

    _prediction_types: tuple[str, ...] = ("epsilon", "v_prediction")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    def step(
        self, model_output: np.ndarray, timestep, sample: np.ndarray, generator: Generators = None
    ) -> SchedulerOutput:
        """One ancestral Euler step from sigma to sigma_next:

            sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
            sigma_down = sqrt(sigma_next^2 - sigma_up^2)
            x_next     = x + (sigma_down - sigma) * (x - x0_pred) / sigma + sigma_up * z

        z ~ N(0, I) is drawn from `generator` at every step (times 0 on the last one, as in diffusers).
        """
        i = self._checked_step_index(timestep)
        sample = sample.astype(np.float32, copy=False)
        sigma = float(self.sigmas[i])
        sigma_next = float(self.sigmas[i + 1])
        pred_original_sample = self._pred_original_sample(model_output, sample, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = max(sigma_next**2 - sigma_up**2, 0.0) ** 0.5
        derivative = (sample - pred_original_sample) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        prev_sample = prev_sample + randn(model_output.shape, generator, model_output.dtype) * sigma_up
        self._step_index = i + 1
        return SchedulerOutput(prev_sample.astype(model_output.dtype, copy=False), pred_original_sample)
