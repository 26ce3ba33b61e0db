"""EulerDiscreteScheduler against diffusers.EulerDiscreteScheduler."""

import numpy as np
import pytest
import torch

from services.schedulers import EulerDiscreteScheduler
from tests.fixtures.schedulers import scheduler_pair


@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("config", ["sd15", "linear_trailing"])
def test_matches_diffusers(check_parity, configs, config, spacing, prediction_type, steps):
    if config == "linear_trailing":
        spacing = "trailing" if spacing == "leading" else spacing
    check_parity(*scheduler_pair(EulerDiscreteScheduler, configs[config], timestep_spacing=spacing,
                                 prediction_type=prediction_type), steps)


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_karras_sigmas": True},
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0, "timestep_spacing": "trailing"},
        {"final_sigmas_type": "sigma_min"},
        {"prediction_type": "sample"},
        {"beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_options_match_diffusers(check_parity, configs, overrides):
    check_parity(*scheduler_pair(EulerDiscreteScheduler, configs["sd15"], **overrides), 10)


def test_zero_terminal_snr_matches_diffusers(check_parity, configs):
    # The terminal sigma is clamped to sqrt(2^24) = 4096: latents start near 4096, where one float32
    # ulp is 5e-4, so the bound is scaled to that magnitude.
    overrides = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    check_parity(*scheduler_pair(EulerDiscreteScheduler, configs["sd15"], **overrides), 10, atol=4096 * 1e-6)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_img2img_matches_diffusers(check_parity, configs, spacing):
    check_parity(*scheduler_pair(EulerDiscreteScheduler, configs["sd15"], timestep_spacing=spacing), 25, start_index=10)


def test_add_noise_matches_diffusers(configs):
    ours, reference = scheduler_pair(EulerDiscreteScheduler, configs["sd15"])
    ours.set_timesteps(10)
    reference.set_timesteps(10)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 3, 4), dtype=np.float32)
    t = ours.timesteps[[0, 7]]
    expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, t), expected, atol=1e-5)


def test_step_rejects_integer_index(configs):
    scheduler = EulerDiscreteScheduler.from_config(configs["sd15"])
    scheduler.set_timesteps(10)
    sample = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"scheduler.timesteps"):
        scheduler.step(sample, 0, sample)


@pytest.mark.parametrize(
    "config",
    [{"interpolation_type": "log_linear"}, {"use_exponential_sigmas": True}, {"timestep_type": "continuous"}],
)
def test_rejects_unsupported(config):
    with pytest.raises(ValueError, match=next(iter(config))):
        EulerDiscreteScheduler.from_config(config)
