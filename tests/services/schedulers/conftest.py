"""Parity harness: run our numpy scheduler and diffusers' torch one side by side on a dummy model.

Each scheduler follows its own trajectory from the same initial latents; the latents, the model
inputs and the x_0 predictions must agree at every step within ATOL + RTOL * |reference|. For O(1)
latents the bound is ATOL = 1e-4. RTOL (about 8 float32 ulps) matters only where values are large:
Euler on the linear schedule starts at sigma ~157, and the dummy model's x_0 predictions reach ~500
at t = 999 there, where one float32 ulp is already 3e-5 and torch's float32 rounding alone exceeds 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

ATOL = 1e-4
RTOL = 1e-6

# Stable Diffusion 1.x's scheduler_config.json (a PNDM config, as shipped).
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# DDPM's linear schedule with trailing spacing (starts at t = 999).
LINEAR_TRAILING_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "timestep_spacing": "trailing",
    "clip_sample": False,
}
# Cosine schedule, linspace spacing.
COSINE_LINSPACE_CONFIG = {
    "beta_schedule": "squaredcos_cap_v2",
    "timestep_spacing": "linspace",
    "clip_sample": False,
}
CONFIGS = {"sd15": SD15_CONFIG, "linear_trailing": LINEAR_TRAILING_CONFIG, "cosine_linspace": COSINE_LINSPACE_CONFIG}
SHAPE = (2, 4, 8, 8)


def dummy_model(sample, timestep):
    """A deterministic stand-in for a UNet; the same float32 arithmetic on numpy arrays and torch tensors."""
    return 0.1 * sample + 0.05 * math.cos(float(timestep) / 100)


def assert_close(ours: np.ndarray, reference: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    np.testing.assert_allclose(ours, reference.numpy(), rtol=RTOL, atol=atol, err_msg=what)


def numpy_noise(seeds: Sequence[int]):
    """The project's noise rule, written out: row i from default_rng(seeds[i]), in call order."""
    generators = [np.random.default_rng(s) for s in seeds]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        noise = np.stack([g.standard_normal(tuple(shape[1:]), dtype=np.float32) for g in generators])
        return torch.from_numpy(noise).to(dtype or torch.float32)

    return randn_tensor


@pytest.fixture
def check_parity(monkeypatch):
    """check_parity(ours, reference, num_inference_steps, seeds=None, diffusers_module=None,
    start_index=0, step_kwargs=None, atol=ATOL) runs the full loop on both and compares every step.

    seeds: per-row seeds for schedulers that draw noise; ours gets numpy generators, and
    `diffusers_module.randn_tensor` is patched to return the same numbers from twin generators.
    start_index > 0: image-to-image, entering the schedule at that index via `add_noise` (and
    `set_begin_index` where the scheduler has it), as diffusers' img2img pipelines do.
    """

    def check(ours, reference, num_inference_steps, *, seeds=None, diffusers_module=None,
              start_index=0, step_kwargs=None, atol=ATOL):
        step_kwargs = step_kwargs or {}
        generators = None
        if seeds is not None:
            generators = [np.random.default_rng(s) for s in seeds]
            monkeypatch.setattr(diffusers_module, "randn_tensor", numpy_noise(seeds))
        ours.set_timesteps(num_inference_steps)
        reference.set_timesteps(num_inference_steps)
        ref_timesteps = reference.timesteps.numpy()
        assert ours.timesteps.dtype == ref_timesteps.dtype
        np.testing.assert_allclose(ours.timesteps, ref_timesteps, rtol=0, atol=1e-4)
        if getattr(reference, "sigmas", None) is not None:
            np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=1e-5, atol=1e-6)
        assert ours.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)

        rng = np.random.default_rng(1234)
        noise = rng.standard_normal(SHAPE, dtype=np.float32)
        if start_index == 0:
            x = noise * ours.init_noise_sigma
            y = torch.from_numpy(noise) * reference.init_noise_sigma
        else:
            image = rng.uniform(-1, 1, SHAPE).astype(np.float32)
            if hasattr(reference, "set_begin_index"):
                ours.set_begin_index(start_index)
                reference.set_begin_index(start_index)
            t0 = ours.timesteps[start_index:start_index + 1].repeat(SHAPE[0])
            x = ours.add_noise(image, noise, t0)
            y = reference.add_noise(torch.from_numpy(image), torch.from_numpy(noise), torch.from_numpy(t0))
        assert_close(x, y, "initial latents", atol)

        pairs = list(zip(ours.timesteps[start_index:], reference.timesteps[start_index:]))
        for i, (t_ours, t_ref) in enumerate(pairs):
            x_in = ours.scale_model_input(x, t_ours)
            y_in = reference.scale_model_input(y, t_ref)
            assert_close(x_in, y_in, f"model input at step {i}", atol)
            out = ours.step(dummy_model(x_in, t_ours), t_ours, x, generator=generators, **step_kwargs)
            ref = reference.step(dummy_model(y_in, t_ref), t_ref, y, **step_kwargs)
            assert_close(out.prev_sample, ref.prev_sample, f"prev_sample at step {i}/{len(pairs)}", atol)
            if getattr(ref, "pred_original_sample", None) is not None:
                what = f"pred_original_sample at step {i}"
                assert_close(out.pred_original_sample, ref.pred_original_sample, what, atol)
            x, y = out.prev_sample, ref.prev_sample

    return check


@pytest.fixture
def configs():
    """Model scheduler configs by name (fresh copies): sd15, linear_trailing, cosine_linspace."""
    return {name: dict(config) for name, config in CONFIGS.items()}
