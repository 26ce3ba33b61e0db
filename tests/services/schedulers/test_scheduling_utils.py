"""Shared pieces: the noise rule, config handling, torch-freedom."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.schedulers import DDIMScheduler
from services.schedulers.scheduling_utils import randn


def test_randn_draws_row_i_from_generator_i():
    noise = randn((2, 3, 4), [np.random.default_rng(7), np.random.default_rng(8)])
    assert noise.dtype == np.float32
    np.testing.assert_array_equal(noise[1], np.random.default_rng(8).standard_normal((3, 4), dtype=np.float32))


def test_randn_single_generator_draws_rows_in_order():
    g = np.random.default_rng(7)
    rows = [g.standard_normal((3, 4), dtype=np.float32) for _ in range(2)]
    np.testing.assert_array_equal(randn((2, 3, 4), np.random.default_rng(7)), np.stack(rows))


def test_randn_needs_one_generator_per_row():
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn((3, 4), [np.random.default_rng(0)] * 2)


def test_from_config_ignores_private_and_foreign_keys_and_reused_defaults():
    config = {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.30.0",
        "_use_default_values": ["timestep_spacing"],
        "timestep_spacing": "linspace",
        "use_karras_sigmas": True,
        "some_future_option": 1,
        "steps_offset": 1,
    }
    scheduler = DDIMScheduler.from_config(config)
    assert (scheduler.config.timestep_spacing, scheduler.config.steps_offset) == ("leading", 1)
    assert "use_karras_sigmas" not in scheduler.config
    assert scheduler.config["clip_sample"] is True  # DDIM's own default


def test_serving_import_does_not_load_torch():
    code = "import sys, services.schedulers; sys.exit('torch' in sys.modules)"
    repo_root = Path(__file__).resolve().parents[3]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root).returncode == 0
