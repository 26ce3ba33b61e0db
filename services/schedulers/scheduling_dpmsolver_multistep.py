"""DPM-Solver++ multistep sampling, the "DPM++ 2M" sampler (Lu et al. 2022, "DPM-Solver++: Fast Solver
for Guided Sampling of Diffusion Probabilistic Models", arXiv:2211.01095), a numpy port of diffusers'
`DPMSolverMultistepScheduler` restricted to algorithm_type "dpmsolver++" and solver_order 1 or 2."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def _alpha_sigma_lambda(sigma: float) -> tuple[float, float, float]:
    """VP coefficients of x_t = alpha_t x_0 + sigma_t eps from the schedule's sigma = sigma_t / alpha_t,
    and the half log-SNR lambda_t = log(alpha_t / sigma_t) = -log(sigma), infinite at sigma = 0."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t, (-math.log(sigma) if sigma > 0 else math.inf)


class DPMSolverMultistepScheduler(StepIndexMixin, SchedulerMixin):
    """DPM-Solver++(2M): second-order multistep on the data-prediction ODE, first order on the first
    step (no history yet) and on the last (lower_order_final / final sigma 0).

    Takes diffusers' constructor arguments. Supported: algorithm_type "dpmsolver++", solver_order 1-2,
    solver_type midpoint/heun, prediction_type epsilon/v_prediction/sample, use_karras_sigmas,
    final_sigmas_type zero/sigma_min, lower_order_final, euler_at_final. Not implemented (ValueError):
    SDE and non-"++" variants, order 3, thresholding, lambda_min_clipped, learned variance,
    exponential/beta/Lu/flow sigmas, dynamic shifting.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        self._register_config(locals())
        name = type(self).__name__
        check_supported(name, "algorithm_type", algorithm_type, ["dpmsolver++"])
        check_supported(name, "solver_order", solver_order, [1, 2])
        check_supported(name, "solver_type", solver_type, ["midpoint", "heun"])
        check_supported(name, "prediction_type", prediction_type, ["epsilon", "v_prediction", "sample"])
        check_supported(name, "final_sigmas_type", final_sigmas_type, ["zero", "sigma_min"])
        check_supported(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_supported(name, "lambda_min_clipped", lambda_min_clipped, [-float("inf")])
        # diffusers acts on "learned"/"learned_range" only; any other value (a DDPM config's
        # "fixed_small", switched here with from_config) behaves as None there, and here.
        if variance_type in ("learned", "learned_range"):
            check_supported(name, "variance_type", variance_type, [None])
        for flag in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                     "use_flow_sigmas", "use_dynamic_shifting"):
            check_supported(name, flag, bool(self.config[flag]), [False])
        self.alphas_cumprod = make_alphas_cumprod(
            name, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keep the terminal sigma finite, as diffusers does
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray | None = None
        self.sigmas: np.ndarray | None = None
        self.model_outputs: list[np.ndarray | None] = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Fill `timesteps` (int64) and `sigmas` (float32, one more, ending in the final sigma); reset history.

        linspace and leading spacings place n + 1 points and drop the last, as diffusers does here.
        """
        c = self.config
        n = num_inference_steps
        if c.timestep_spacing == "trailing":
            timesteps = spaced_timesteps(type(self).__name__, "trailing", c.num_train_timesteps, n)
        else:
            timesteps = spaced_timesteps(
                type(self).__name__, c.timestep_spacing, c.num_train_timesteps, n + 1, c.steps_offset
            )[:-1]
        timesteps = timesteps.round()
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(float(self.train_sigmas[0]), float(self.train_sigmas[-1]), n)
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas))
            if c.beta_schedule != "squaredcos_cap_v2":  # otherwise truncated below, as diffusers does
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        sigma_last = 0.0 if c.final_sigmas_type == "zero" else float(self.train_sigmas[0])
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self._reset_step_index()

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        """x_theta(x_t, t): DPM-Solver++ works with the model's estimate of x_0 (Lu et al. 2022, sec. 4)."""
        alpha_t, sigma_t, _ = _alpha_sigma_lambda(sigma)
        if self.config.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if self.config.prediction_type == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return model_output

    def step(
        self, model_output: np.ndarray, timestep, sample: np.ndarray, generator: Generators = None
    ) -> SchedulerOutput:
        """One DPM-Solver++ step from s = t_{i-1} to t = t_i, with h = lambda_t - lambda_s:

            DPM-Solver++(1), i.e. DDIM (sec. 4):  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0
            2M, midpoint (Algorithm 2):           ... - 0.5 alpha_t (e^{-h} - 1) D1
            2M, heun (diffusers' variant):        ... + alpha_t ((e^{-h} - 1) / h + 1) D1

        where D0 is the current x_0 prediction, D1 = (D0 - previous x_0 prediction) / r and
        r = h_{i-1} / h. Deterministic: `generator` is accepted for a uniform interface and unused.
        `pred_original_sample` is D0.
        """
        if self.timesteps is None or self.sigmas is None:
            raise ValueError("call set_timesteps before step")
        c = self.config
        i, n = self._current_step_index(timestep), len(self.timesteps)
        lower_order_final = i == n - 1 and (
            c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"
        )
        x0 = self._data_prediction(model_output, sample, float(self.sigmas[i]))
        self.model_outputs = [*self.model_outputs[1:], x0]
        sample = sample.astype(np.float32, copy=False)

        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(float(self.sigmas[i + 1]))
        _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(float(self.sigmas[i]))
        h = lambda_t - lambda_s0
        phi = math.expm1(-h)  # e^{-h} - 1
        prev_sample = (sigma_t / sigma_s0) * sample - (alpha_t * phi) * x0
        if c.solver_order == 2 and self.lower_order_nums >= 1 and not lower_order_final:
            _, _, lambda_s1 = _alpha_sigma_lambda(float(self.sigmas[i - 1]))
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (1.0 / r0) * (x0 - self.model_outputs[-2])
            if c.solver_type == "midpoint":
                prev_sample = prev_sample - (0.5 * alpha_t * phi) * d1
            else:
                prev_sample = prev_sample + (alpha_t * (phi / h + 1.0)) * d1

        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index = i + 1
        return SchedulerOutput(prev_sample.astype(model_output.dtype, copy=False), x0)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """x_t = alpha_t x_0 + sigma_t noise at each row's timestep (or at the begin index)."""
        if self.sigmas is None:
            raise ValueError("call set_timesteps before add_noise")
        sigmas = self.sigmas.astype(original_samples.dtype)[self._noise_indices(np.atleast_1d(timesteps))]
        sigmas = broadcast_rows(sigmas, original_samples.ndim)
        alpha_t = 1 / (sigmas**2 + 1) ** 0.5
        return alpha_t * original_samples + (sigmas * alpha_t) * noise
