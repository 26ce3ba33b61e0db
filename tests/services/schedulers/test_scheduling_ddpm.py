"""DDPMScheduler against diffusers.DDPMScheduler, same noise fed to both."""

import diffusers.schedulers.scheduling_ddpm as reference_module
import numpy as np
import pytest
import torch

from services.schedulers import DDPMScheduler
from tests.fixtures.schedulers import scheduler_pair

SEEDS = [21, 22]


@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config", ["sd15", "linear_trailing"])
def test_matches_diffusers(check_parity, configs, config, prediction_type, steps):
    ours, reference = scheduler_pair(DDPMScheduler, configs[config], prediction_type=prediction_type)
    check_parity(ours, reference, steps, seeds=SEEDS, diffusers_module=reference_module)


@pytest.mark.parametrize(
    "overrides",
    [
        {"variance_type": "fixed_large"},
        {"prediction_type": "sample"},
        {"clip_sample": True},
        {"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_options_match_diffusers(check_parity, configs, overrides):
    ours, reference = scheduler_pair(DDPMScheduler, configs["sd15"], **overrides)
    check_parity(ours, reference, 10, seeds=SEEDS, diffusers_module=reference_module)


def test_full_chain_without_set_timesteps_steps_by_one():
    scheduler = DDPMScheduler()
    assert scheduler.previous_timestep(999) == 998
    assert scheduler.previous_timestep(0) == -1


def test_step_at_t0_draws_no_noise(configs):
    scheduler = DDPMScheduler.from_config(configs["cosine_linspace"])
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[-1] == 0
    generator = np.random.default_rng(0)
    state = generator.bit_generator.state
    sample = np.ones((1, 4, 2, 2), np.float32)
    scheduler.step(0.1 * sample, scheduler.timesteps[-1], sample, generator=generator)
    assert generator.bit_generator.state == state


def test_add_noise_matches_diffusers(configs):
    ours, reference = scheduler_pair(DDPMScheduler, configs["linear_trailing"])
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 2, 3, 4, 4), dtype=np.float32)
    t = np.array([500, 3])
    expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, t), expected, atol=1e-6)


@pytest.mark.parametrize("config", [{"variance_type": "learned_range"}, {"beta_schedule": "laplace"}])
def test_rejects_unsupported(config):
    with pytest.raises(ValueError, match=next(iter(config))):
        DDPMScheduler.from_config(config)
