"""Pieces shared by the numpy schedulers: noise schedules, timestep spacing, config handling.

Numerical conventions, kept by every scheduler in this package:
- the training schedule (betas, alphas_cumprod, sigmas) is float32, computed as diffusers does;
- per-step coefficients are Python floats derived from it, so array arithmetic stays in the
  sample's dtype (Python floats never promote a float32 array, under numpy 1 or 2);
- noise obeys the project's determinism rule (see `randn`).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Generators = np.random.Generator | Sequence[np.random.Generator] | None
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


@dataclass
class SchedulerOutput:
    """What `step` returns, as in diffusers.

    prev_sample: x_{t-1}, the next model input. pred_original_sample: the model's estimate of x_0.
    """

    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None


class SchedulerConfig(dict):
    """The constructor arguments, read as `config.key` or `config["key"]` like diffusers' FrozenDict."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def check_supported(owner: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise a ValueError naming the option when `value` is not one this port implements."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{owner}: {name}={value!r} is not supported; supported: {allowed}")


class SchedulerMixin:
    """Config storage, `from_config`, and the defaults most schedulers share."""

    order = 1
    config: SchedulerConfig
    timesteps: np.ndarray | None  # the schedule set_timesteps chose; None before, where there is no default

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             generator: Generators = None) -> SchedulerOutput:
        """One denoising step (each scheduler's own update rule)."""
        raise NotImplementedError

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """The forward process at `timesteps` (image-to-image's starting latents)."""
        raise NotImplementedError

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise; sigma-parameterised schedulers override it."""
        return 1.0

    def _register_config(self, init_locals: dict[str, Any]) -> None:
        """Store the constructor's arguments; call first thing in `__init__` with `locals()`."""
        self.config = SchedulerConfig((k, v) for k, v in init_locals.items() if k != "self" and not k.startswith("__"))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any):
        """Build from a diffusers `scheduler_config.json` dict (or another scheduler's `config`).

        Like diffusers' `from_config`: keys the constructor does not take (`_class_name`,
        `_diffusers_version`, another algorithm's options) are ignored, keys listed in
        `_use_default_values` (left at their defaults by the config's own class) are dropped so this
        class's defaults apply, and `overrides` win over the config.
        """
        params = _init_parameters(cls.__init__)
        defaulted = set(config.get("_use_default_values", ()))
        kwargs = {k: v for k, v in config.items() if k in params and k not in defaulted}
        return cls(**{**kwargs, **overrides})

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Identity: only sigma-parameterised (Karras-style) schedulers rescale the model input."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class StepIndexMixin:
    """Step counting for schedulers that walk a sigma table (diffusers' `step_index`/`begin_index`).

    The step index is found from the first timestep passed to `scale_model_input`/`step`, or set by
    `set_begin_index` (image-to-image pipelines start part-way through the schedule).
    """

    timesteps: np.ndarray | None  # None until set_timesteps, in schedulers that have no default schedule
    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _reset_step_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def _current_step_index(self, timestep: Any) -> int:
        """The index of the step at `timestep`: found from it (or the begin index) on the first step."""
        if self._step_index is None:
            if self._begin_index is None:
                self._step_index = index_for_timestep(self._schedule_timesteps(), timestep)
            else:
                self._step_index = self._begin_index
        return self._step_index

    def _noise_indices(self, timesteps: np.ndarray) -> list[int]:
        """Schedule indices for `add_noise`, following diffusers' begin/step index precedence."""
        if self._begin_index is None:
            return [index_for_timestep(self._schedule_timesteps(), t) for t in timesteps]
        return [self._step_index if self._step_index is not None else self._begin_index] * len(timesteps)

    def _schedule_timesteps(self) -> np.ndarray:
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps first")
        return self.timesteps


def index_for_timestep(schedule: np.ndarray, timestep: Any) -> int:
    """Position of `timestep` in `schedule`.

    When it occurs twice the second match is used, as diffusers does, so a schedule entered
    part-way (image-to-image) does not skip a sigma.
    """
    matches = np.flatnonzero(schedule == np.asarray(timestep).item())
    if len(matches) == 0:
        raise ValueError(f"timestep {timestep} is not in the schedule; pass values from scheduler.timesteps")
    return int(matches[1] if len(matches) > 1 else matches[0])


def cumprod_alphas(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) as float32, accumulated in float64 as torch's CPU cumprod does."""
    return np.cumprod(1.0 - betas, dtype=np.float64).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the final step has zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(cumprod_alphas(betas))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]  # scalars, copied
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_alphas_cumprod(
    owner: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """Training noise schedule as alpha_bar_t (float32) for t = 0..T-1, from betas:

    linear: DDPM (Ho et al. 2020, sec. 4); scaled_linear: linear in sqrt(beta), Stable Diffusion's;
    squaredcos_cap_v2: cosine alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008
    (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999.

    Every request builds a scheduler, and the cosine schedule is a Python loop over the
    training steps (0.4 ms at T=1000): schedules from parameters are computed once per
    parameters and each caller gets its own copy.
    """
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        return cumprod_alphas(rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas)
    return _schedule(owner, int(num_train_timesteps), float(beta_start), float(beta_end), beta_schedule,
                     bool(rescale_betas_zero_snr)).copy()


@functools.lru_cache(maxsize=64)
def _init_parameters(init: Callable[..., None]) -> frozenset[str]:
    """The constructor's argument names (what `from_config` passes on)."""
    return frozenset(inspect.signature(init).parameters) - {"self"}


@functools.lru_cache(maxsize=64)
def _schedule(owner: str, num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
              rescale_betas_zero_snr: bool) -> np.ndarray:
    """make_alphas_cumprod's schedule from parameters, read-only (callers copy it)."""
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    else:
        raise ValueError(
            f"{owner}: beta_schedule={beta_schedule!r} is not supported; "
            "supported: ['linear', 'scaled_linear', 'squaredcos_cap_v2'] or trained_betas"
        )
    alphas_cumprod = cumprod_alphas(rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas)
    alphas_cumprod.flags.writeable = False
    return alphas_cumprod


def spaced_timesteps(
    owner: str, timestep_spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0
) -> np.ndarray:
    """Descending inference timesteps as float64 (Lin et al. 2023, arXiv:2305.08891, Table 2).

    linspace: evenly from T-1 to 0, not rounded (Euler keeps fractional timesteps);
    leading: k * (T // n) + steps_offset; trailing: round(T - k * T / n) - 1, which starts at T-1.
    """
    check_supported(owner, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    n, total = num_inference_steps, num_train_timesteps
    if not 1 <= n <= total:
        raise ValueError(f"{owner}: num_inference_steps must be in [1, {total}], got {n}")
    if timestep_spacing == "linspace":
        return np.linspace(0, total - 1, n)[::-1].copy()
    if timestep_spacing == "leading":
        return (np.arange(n) * (total // n))[::-1].astype(np.float64) + steps_offset
    return np.arange(total, 0, -total / n).round() - 1  # trailing


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels of Karras et al. 2022 (arXiv:2206.00364), eq. 5:
    sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, num_inference_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps for `sigmas`, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(np.shape(sigmas))


def broadcast_rows(values: np.ndarray, ndim: int) -> np.ndarray:
    """Shape per-row scalars [B] to [B, 1, ..., 1] so they broadcast against a batch of rank `ndim`."""
    values = np.asarray(values).reshape(-1)
    return values.reshape(values.shape + (1,) * (ndim - 1))


def add_noise_vp(
    alphas_cumprod: np.ndarray, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any
) -> np.ndarray:
    """Forward process q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4)."""
    alpha_bar = alphas_cumprod.astype(original_samples.dtype)[np.asarray(timesteps, dtype=np.int64)]
    sqrt_alpha_bar = broadcast_rows(alpha_bar**0.5, original_samples.ndim)
    sqrt_one_minus_alpha_bar = broadcast_rows((1 - alpha_bar) ** 0.5, original_samples.ndim)
    return sqrt_alpha_bar * original_samples + sqrt_one_minus_alpha_bar * noise


def randn(shape: Sequence[int], generator: Generators, dtype: Any = np.float32) -> np.ndarray:
    """Standard normal noise under the project's determinism rule.

    With a list of generators, row i is `generator[i].standard_normal(shape[1:], dtype=float32)`, so
    an image's noise does not depend on its batch-mates. One generator draws the rows in order
    (the same numbers as drawing them one by one); None draws from fresh OS entropy.
    """
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        noise = np.stack([g.standard_normal(tuple(shape[1:]), dtype=np.float32) for g in generator])
    else:
        noise = (generator or np.random.default_rng()).standard_normal(tuple(shape), dtype=np.float32)
    return noise.astype(dtype, copy=False)
