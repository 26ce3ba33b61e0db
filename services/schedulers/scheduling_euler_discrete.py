"""Euler sampling of the probability-flow ODE in the sigma parameterisation (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", arXiv:2206.00364, Algorithm 1 with
no churn), a numpy port of diffusers' `EulerDiscreteScheduler`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .scheduling_utils import (
    TIMESTEP_SPACINGS,
    Generators,
    SchedulerMixin,
    SchedulerOutput,
    StepIndexMixin,
    broadcast_rows,
    check_supported,
    karras_sigmas,
    make_alphas_cumprod,
    sigma_to_t,
    spaced_timesteps,
)


class EulerDiscreteScheduler(StepIndexMixin, SchedulerMixin):
    """Euler steps over sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), where x = x_0 + sigma * eps.

    Takes diffusers' constructor arguments. Supported: interpolation_type "linear",
    use_karras_sigmas (with sigma_min/sigma_max), final_sigmas_type "zero"/"sigma_min",
    timestep_type "discrete", prediction_type epsilon/v_prediction/sample. Not implemented:
    log_linear interpolation, exponential/beta sigmas, continuous timesteps, s_churn (stochastic
    Euler); they raise ValueError.
    """

    _prediction_types: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    timesteps: np.ndarray  # set from the constructor on

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        self._register_config(locals())
        name = type(self).__name__
        check_supported(name, "prediction_type", prediction_type, self._prediction_types)
        check_supported(name, "interpolation_type", interpolation_type, ["linear"])
        check_supported(name, "use_exponential_sigmas", bool(use_exponential_sigmas), [False])
        check_supported(name, "use_beta_sigmas", bool(use_beta_sigmas), [False])
        check_supported(name, "timestep_type", timestep_type, ["discrete"])
        check_supported(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_supported(name, "final_sigmas_type", final_sigmas_type, ["zero", "sigma_min"])
        self.alphas_cumprod = make_alphas_cumprod(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keep the terminal sigma finite, as diffusers does
        # sigma_t for every training timestep t = 0..T-1 (float32, increasing).
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.num_inference_steps: int | None = None
        self.timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.sigmas = np.concatenate([self.train_sigmas[::-1], np.zeros(1, np.float32)])

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) for "leading"."""
        max_sigma = float(self.sigmas.max())
        return max_sigma if self.config.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Fill `timesteps` (float32) and `sigmas` (float32, one more than timesteps, ending in the final sigma)."""
        c = self.config
        timesteps = spaced_timesteps(
            type(self).__name__, c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset
        ).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        if c.use_karras_sigmas:
            sigma_min = c.sigma_min if c.sigma_min is not None else sigmas[-1]
            sigma_max = c.sigma_max if c.sigma_max is not None else sigmas[0]
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas))
        sigma_last = 0.0 if c.final_sigmas_type == "zero" else float(self.train_sigmas[0])
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self.num_inference_steps = num_inference_steps
        self._reset_step_index()

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """The model was trained on x_t = sqrt(alpha_bar) (x_0 + sigma eps): feed it x / sqrt(sigma^2 + 1)."""
        sigma = float(self.sigmas[self._current_step_index(timestep)])
        return sample / (sigma**2 + 1) ** 0.5

    def _checked_step_index(self, timestep: Any) -> int:
        """The step index of `timestep`, refusing an integer step index passed in its place."""
        if isinstance(timestep, (int, np.integer)):
            raise ValueError(
                f"{type(self).__name__}.step takes a value from scheduler.timesteps, not an integer step index"
            )
        return self._current_step_index(timestep)

    def _pred_original_sample(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        """The x_0 estimate D(x; sigma) (Karras et al. 2022, eq. 3) for each prediction type."""
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.config.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        return model_output

    def step(
        self, model_output: np.ndarray, timestep, sample: np.ndarray, generator: Generators = None
    ) -> SchedulerOutput:
        """One Euler step of dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eqs. 1 and 3, Algorithm 1):

            x_next = x + (sigma_next - sigma) * (x - x0_pred) / sigma

        Deterministic: `generator` is accepted for a uniform interface and unused.
        """
        i = self._checked_step_index(timestep)
        sample = sample.astype(np.float32, copy=False)
        sigma = float(self.sigmas[i])
        sigma_next = float(self.sigmas[i + 1])
        pred_original_sample = self._pred_original_sample(model_output, sample, sigma)
        derivative = (sample - pred_original_sample) / sigma
        prev_sample = sample + derivative * (sigma_next - sigma)
        self._step_index = i + 1
        return SchedulerOutput(prev_sample.astype(model_output.dtype, copy=False), pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x = x_0 + sigma * noise, with the sigma of each row's timestep (or of the begin index)."""
        sigmas = self.sigmas.astype(original_samples.dtype)[self._noise_indices(np.atleast_1d(timesteps))]
        return original_samples + noise * broadcast_rows(sigmas, original_samples.ndim)
