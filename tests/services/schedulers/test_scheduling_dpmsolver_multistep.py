"""DPMSolverMultistepScheduler (DPM++ 2M) against diffusers.DPMSolverMultistepScheduler."""

import numpy as np
import pytest
import torch

from services.schedulers import DPMSolverMultistepScheduler
from tests.fixtures.schedulers import scheduler_pair


@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("config", ["sd15", "linear_trailing"])
def test_matches_diffusers(check_parity, configs, config, spacing, prediction_type, steps):
    if config == "linear_trailing":
        spacing = "trailing" if spacing == "leading" else spacing
    check_parity(*scheduler_pair(DPMSolverMultistepScheduler, configs[config], timestep_spacing=spacing,
                                 prediction_type=prediction_type), steps)


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_karras_sigmas": True},
        {"solver_type": "heun"},
        {"solver_order": 1},
        {"final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
        {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
        {"prediction_type": "sample"},
        {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    ],
)
@pytest.mark.parametrize("steps", [10, 20])
def test_options_match_diffusers(check_parity, configs, overrides, steps):
    check_parity(*scheduler_pair(DPMSolverMultistepScheduler, configs["sd15"], **overrides), steps)


def test_img2img_matches_diffusers(check_parity, configs):
    check_parity(*scheduler_pair(DPMSolverMultistepScheduler, configs["sd15"]), 25, start_index=10)


def test_add_noise_matches_diffusers(configs):
    ours, reference = scheduler_pair(DPMSolverMultistepScheduler, configs["sd15"])
    ours.set_timesteps(10)
    reference.set_timesteps(10)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 3, 4), dtype=np.float32)
    t = ours.timesteps[[0, 7]]
    expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, t), expected, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        {"algorithm_type": "sde-dpmsolver++"},
        {"solver_order": 3},
        {"lambda_min_clipped": -5.1},
        {"use_lu_lambdas": True},
        {"thresholding": True},
    ],
)
def test_rejects_unsupported(config):
    with pytest.raises(ValueError, match=next(iter(config))):
        DPMSolverMultistepScheduler.from_config(config)


def test_step_requires_set_timesteps():
    scheduler = DPMSolverMultistepScheduler()
    sample = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 999, sample)
