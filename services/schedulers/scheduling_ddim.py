"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502), a numpy
port of diffusers' `DDIMScheduler`."""

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
    make_alphas_cumprod,
    randn,
    spaced_timesteps,
)


class DDIMScheduler(SchedulerMixin):
    """DDIM: deterministic for eta=0, ancestral (DDPM-like) noise for eta>0.

    Takes diffusers' constructor arguments. Not implemented: `thresholding=True`.
    One instance follows one trajectory at a time; `set_timesteps` starts a new one.
    """

    timesteps: np.ndarray  # set from the constructor on

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._register_config(locals())
        name = type(self).__name__
        check_supported(name, "prediction_type", prediction_type, ["epsilon", "v_prediction", "sample"])
        check_supported(name, "thresholding", thresholding, [False])
        check_supported(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.alphas_cumprod = make_alphas_cumprod(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        # alpha_bar "before" the first training step, used by the last sampling step.
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(num_train_timesteps)[::-1].astype(np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Fill `timesteps` (int64, descending) for a run of `num_inference_steps` steps."""
        c = self.config
        timesteps = spaced_timesteps(
            type(self).__name__, c.timestep_spacing, c.num_train_timesteps, num_inference_steps, c.steps_offset
        )
        self.timesteps = timesteps.round().astype(np.int64)
        self.num_inference_steps = num_inference_steps

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        generator: Generators = None,
        *,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
    ) -> SchedulerOutput:
        """One DDIM update x_t -> x_{t-1} (Song et al. 2021, eq. 12):

            x_{t-1} = sqrt(a_prev) * x0_pred + sqrt(1 - a_prev - sigma_t^2) * eps_pred + sigma_t * z
            sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)      (eq. 16)

        with a = alpha_bar and z ~ N(0, I) drawn from `generator` (only when eta > 0).
        The previous timestep is t - T // n, as in diffusers, whatever the spacing.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        c = self.config
        t = int(timestep)
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = float(self.alphas_cumprod[t])
        alpha_prod_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t

        if c.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            pred_epsilon = model_output
        elif c.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
        else:  # v_prediction: v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022, arXiv:2202.00512)
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample

        if c.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -c.clip_sample_range, c.clip_sample_range)
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5

        variance = (1 - alpha_prod_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_prev)
        std_dev_t = eta * variance**0.5
        direction = (1 - alpha_prod_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_prev**0.5 * pred_original_sample + direction
        if eta > 0:
            prev_sample = prev_sample + std_dev_t * randn(model_output.shape, generator, model_output.dtype)
        return SchedulerOutput(prev_sample, pred_original_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, per row's timestep."""
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)
