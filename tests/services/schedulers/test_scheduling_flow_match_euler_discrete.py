"""FlowMatchEulerDiscreteScheduler against diffusers', step by step, with the schedules FLUX-style
pipelines set (custom sigmas linspace(1, 1/n, n), the resolution-dependent mu) and the options."""

import diffusers
import numpy as np
import pytest
import torch

from services.schedulers import FlowMatchEulerDiscreteScheduler, make_scheduler
from services.schedulers.scheduling_flow_match_euler_discrete import calculate_shift

# FLUX.1-dev's scheduler_config.json, as shipped.
FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
            "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
# SD3's: a fixed shift, no dynamic shifting.
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SHAPE = (2, 16, 8, 8)


def dummy_velocity(x, sigma):
    return 0.3 * x - 0.2 * float(sigma)


def run_both(config, steps, *, flux_sigmas, image_seq_len=1024, start_index=0, **overrides):
    ours = FlowMatchEulerDiscreteScheduler.from_config(config, **overrides)
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config, **overrides)
    kwargs = {}
    if flux_sigmas:  # what FluxPipeline passes
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if ours.config.use_dynamic_shifting:
        kwargs["mu"] = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.15))
    ours.set_timesteps(None if flux_sigmas else steps, **kwargs)
    ref.set_timesteps(None if flux_sigmas else steps, **kwargs)
    assert ours.timesteps.dtype == np.float32
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(SHAPE, dtype=np.float32)
    if start_index:
        image = rng.uniform(-1, 1, SHAPE).astype(np.float32)
        ours.set_begin_index(start_index)
        ref.set_begin_index(start_index)
        t0 = ours.timesteps[start_index:start_index + 1]
        x = ours.scale_noise(image, t0, noise)
        y = ref.scale_noise(torch.from_numpy(image), torch.from_numpy(t0), torch.from_numpy(noise))
        np.testing.assert_allclose(x, y.numpy(), atol=1e-6)
    else:
        x, y = noise, torch.from_numpy(noise)
    for i, (t, t_ref) in enumerate(zip(ours.timesteps[start_index:], ref.timesteps[start_index:])):
        out = ours.step(dummy_velocity(x, t / 1000), t, x)
        ref_out = ref.step(dummy_velocity(y, t_ref / 1000), t_ref, y)
        np.testing.assert_allclose(out.prev_sample, ref_out.prev_sample.numpy(), atol=1e-5, err_msg=f"step {i}")
        # the x0 estimate previews show: x - sigma * v
        sigma = float(ours.sigmas[start_index + i])
        np.testing.assert_allclose(out.pred_original_sample, x - np.float32(sigma) * dummy_velocity(x, t / 1000),
                                   atol=1e-6)
        x, y = out.prev_sample, ref_out.prev_sample
    return ours


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("image_seq_len", [16, 1024, 4096, 6000])
def test_flux_schedule_matches_diffusers(steps, image_seq_len):
    run_both(FLUX_DEV, steps, flux_sigmas=True, image_seq_len=image_seq_len)


@pytest.mark.parametrize("steps", [1, 10, 28])
def test_fixed_shift_default_schedule_matches_diffusers(steps):
    run_both(SD3, steps, flux_sigmas=False)


@pytest.mark.parametrize("overrides", [
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"shift_terminal": 0.1},
    {"time_shift_type": "linear"},
    {"invert_sigmas": True, "use_dynamic_shifting": False},
    {"shift": 1.0, "use_dynamic_shifting": False},
])
def test_options_match_diffusers(overrides):
    run_both(FLUX_DEV, 12, flux_sigmas=True, **overrides)


def test_image_to_image_entry_matches_diffusers():
    run_both(FLUX_DEV, 20, flux_sigmas=True, start_index=6)


def test_stochastic_sampling_draws_per_row_noise_under_the_determinism_rule():
    s = make_scheduler("flow_match_euler", {**SD3, "stochastic_sampling": True})
    s.set_timesteps(4)
    x = np.ones((2, 3, 4, 4), np.float32)
    v = np.zeros_like(x)
    out = s.step(v, s.timesteps[0], x, generator=[np.random.default_rng(5), np.random.default_rng(6)])
    sigma_next = float(s.sigmas[1])
    expected = (1 - sigma_next) * x[1] + sigma_next * np.random.default_rng(6).standard_normal((3, 4, 4), np.float32)
    np.testing.assert_allclose(out.prev_sample[1], expected, atol=1e-6)


def test_unported_options_are_refused_by_name():
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        make_scheduler("flow_match_euler", {**SD3, "use_beta_sigmas": True})
    with pytest.raises(ValueError, match="mu must be passed"):
        make_scheduler("flow_match_euler", FLUX_DEV).set_timesteps(4)
