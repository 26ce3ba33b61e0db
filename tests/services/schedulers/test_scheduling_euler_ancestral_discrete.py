"""EulerAncestralDiscreteScheduler against diffusers.EulerAncestralDiscreteScheduler, same noise fed to both."""

import diffusers.schedulers.scheduling_euler_ancestral_discrete as reference_module
import numpy as np
import pytest

from services.schedulers import EulerAncestralDiscreteScheduler
from tests.fixtures.schedulers import scheduler_pair

SEEDS = [11, 12]


@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("config", ["sd15", "linear_trailing"])
def test_matches_diffusers(check_parity, configs, config, spacing, prediction_type, steps):
    if config == "linear_trailing":
        spacing = "trailing" if spacing == "leading" else spacing
    ours, reference = scheduler_pair(EulerAncestralDiscreteScheduler, configs[config], timestep_spacing=spacing,
                                     prediction_type=prediction_type)
    check_parity(ours, reference, steps, seeds=SEEDS, diffusers_module=reference_module)


def test_cosine_schedule_matches_diffusers(check_parity, configs):
    check_parity(*scheduler_pair(EulerAncestralDiscreteScheduler, configs["cosine_linspace"]), 10, seeds=SEEDS,
                 diffusers_module=reference_module)


def test_img2img_matches_diffusers(check_parity, configs):
    ours, reference = scheduler_pair(EulerAncestralDiscreteScheduler, configs["sd15"], timestep_spacing="leading")
    check_parity(ours, reference, 25, seeds=SEEDS, diffusers_module=reference_module, start_index=10)


def test_row_noise_does_not_depend_on_batch_mates(configs):
    """Row 1 of a batch seeded [5, 6] equals a batch of one seeded [6]."""
    rows = np.random.default_rng(0).standard_normal((2, 4, 4, 4), dtype=np.float32)
    results = []
    for batch, seeds in ((rows, [5, 6]), (rows[1:], [6])):
        scheduler = EulerAncestralDiscreteScheduler.from_config(configs["sd15"])
        scheduler.set_timesteps(5)
        generators = [np.random.default_rng(s) for s in seeds]
        x = batch * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * scheduler.scale_model_input(x, t), t, x, generator=generators).prev_sample
        results.append(x)
    np.testing.assert_array_equal(results[0][1], results[1][0])


def test_rejects_sample_prediction():
    with pytest.raises(ValueError, match="prediction_type"):
        EulerAncestralDiscreteScheduler(prediction_type="sample")
