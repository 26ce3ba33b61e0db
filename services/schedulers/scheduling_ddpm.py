"""Ancestral DDPM sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239),
a numpy port of diffusers' `DDPMScheduler`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .scheduling_utils import (
    TIMESTEP_SPACINGS,
    Generators,
    SchedulerMixin,
    SchedulerOutput,
    add_noise_vp,
    check_supported,
    index_for_timestep,
    make_alphas_cumprod,
    randn,
    spaced_timesteps,
)


class DDPMScheduler(SchedulerMixin):
    """Samples the posterior q(x_{t-1} | x_t, x0_pred) between consecutive scheduled timesteps.

    Takes diffusers' constructor arguments. Supported: variance_type fixed_small/fixed_large,
    prediction_type epsilon/v_prediction/sample, clip_sample. Not implemented (ValueError): learned
    and log variances, thresholding, the sigmoid/laplace beta schedules, custom timesteps.
    """

    timesteps: np.ndarray  # set from the constructor on

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._register_config(locals())
        name = type(self).__name__
        check_supported(name, "variance_type", variance_type, ["fixed_small", "fixed_large"])
        check_supported(name, "prediction_type", prediction_type, ["epsilon", "v_prediction", "sample"])
        check_supported(name, "thresholding", thresholding, [False])
        check_supported(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.alphas_cumprod = make_alphas_cumprod(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(num_train_timesteps)[::-1].astype(np.int64)  # every step, until set_timesteps

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Fill `timesteps` (int64, descending) for a run of `num_inference_steps` steps."""
        c = self.config
        timesteps = spaced_timesteps(
            type(self).__name__, c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset
        )
        self.timesteps = timesteps.round().astype(np.int64)
        self.num_inference_steps = num_inference_steps

    def previous_timestep(self, timestep: int) -> int:
        """The next timestep in the schedule, or -1 after the last."""
        i = index_for_timestep(self.timesteps, timestep)
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(
        self, model_output: np.ndarray, timestep: int, sample: np.ndarray, generator: Generators = None
    ) -> SchedulerOutput:
        """Sample x_{t'} ~ q(x_{t'} | x_t, x0_pred) for the previous scheduled timestep t' (Ho et al. 2020, eqs. 6-7):

            mean     = sqrt(a_prev) beta / (1 - a_t) x0_pred + sqrt(alpha) (1 - a_prev) / (1 - a_t) x_t
            variance = (1 - a_prev) / (1 - a_t) beta   (fixed_small, "beta tilde")   or   beta   (fixed_large)

        with a = alpha_bar, alpha = a_t / a_prev and beta = 1 - alpha over the skipped span.
        Noise z ~ N(0, I) is drawn from `generator` whenever t > 0, as in diffusers: every step but
        the last, and the last too when the schedule ends at t = 1 (leading spacing, steps_offset=1).
        """
        c = self.config
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        alpha_prod_t = float(self.alphas_cumprod[t])
        alpha_prod_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
        current_alpha_t = alpha_prod_t / alpha_prod_prev
        current_beta_t = 1 - current_alpha_t

        if c.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        elif c.prediction_type == "v_prediction":
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        else:
            pred_original_sample = model_output
        if c.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -c.clip_sample_range, c.clip_sample_range)

        original_coeff = alpha_prod_prev**0.5 * current_beta_t / beta_prod_t
        current_coeff = current_alpha_t**0.5 * beta_prod_prev / beta_prod_t
        prev_sample = original_coeff * pred_original_sample + current_coeff * sample
        if t > 0:
            if c.variance_type == "fixed_small":
                variance = max(beta_prod_prev / beta_prod_t * current_beta_t, 1e-20)
            else:
                variance = current_beta_t
            prev_sample = prev_sample + variance**0.5 * randn(model_output.shape, generator, model_output.dtype)
        return SchedulerOutput(prev_sample, pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, per row's timestep."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)
