"""DDIMScheduler against diffusers.DDIMScheduler."""

import diffusers.schedulers.scheduling_ddim as reference_module
import numpy as np
import pytest
import torch

from services.schedulers import DDIMScheduler
from tests.fixtures.schedulers import scheduler_pair


@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config", ["sd15", "linear_trailing"])
def test_matches_diffusers(check_parity, configs, config, prediction_type, steps):
    check_parity(*scheduler_pair(DDIMScheduler, configs[config], prediction_type=prediction_type), steps)


@pytest.mark.parametrize(
    "overrides",
    [
        {"prediction_type": "sample"},
        {"clip_sample": True, "clip_sample_range": 1.5, "set_alpha_to_one": True},
        {"timestep_spacing": "linspace"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    ],
)
def test_options_match_diffusers(check_parity, configs, overrides):
    check_parity(*scheduler_pair(DDIMScheduler, configs["sd15"], **overrides), 10)


@pytest.mark.parametrize("steps", [1, 10])
def test_eta_noise_matches_diffusers(check_parity, configs, steps):
    ours, reference = scheduler_pair(DDIMScheduler, configs["sd15"])
    check_parity(ours, reference, steps, seeds=[3, 4], diffusers_module=reference_module, step_kwargs={"eta": 1.0})


def test_img2img_matches_diffusers(check_parity, configs):
    check_parity(*scheduler_pair(DDIMScheduler, configs["sd15"]), 25, start_index=10)


def test_add_noise_matches_diffusers(configs):
    ours, reference = scheduler_pair(DDIMScheduler, configs["sd15"])
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 3, 3, 4), dtype=np.float32)
    t = np.array([999, 17])
    expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, t), expected, atol=1e-6)


@pytest.mark.parametrize(
    "config", [{"prediction_type": "flow_prediction"}, {"thresholding": True}, {"beta_schedule": "sigmoid"}]
)
def test_rejects_unsupported(config):
    with pytest.raises(ValueError, match=next(iter(config))):
        DDIMScheduler.from_config(config)
