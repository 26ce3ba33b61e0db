"""make_scheduler: names, building from a model's diffusers config, the options a name pins."""

import typing

import diffusers
import diffusers.schedulers.scheduling_ddim
import diffusers.schedulers.scheduling_ddpm
import diffusers.schedulers.scheduling_euler_ancestral_discrete
import pytest

from services.schedulers import FLOW_SCHEDULERS, SCHEDULERS, SchedulerName, make_scheduler, supported_schedulers

REFERENCES = {
    "ddim": (diffusers.DDIMScheduler, None),
    "euler": (diffusers.EulerDiscreteScheduler, None),
    "euler_ancestral": (
        diffusers.EulerAncestralDiscreteScheduler,
        diffusers.schedulers.scheduling_euler_ancestral_discrete,
    ),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, None),
    "ddpm": (diffusers.DDPMScheduler, diffusers.schedulers.scheduling_ddpm),
}


def test_the_api_type_names_every_scheduler_in_order():
    """SchedulerName is the schemas' (and OpenAPI's) enum of SCHEDULERS: same names, same order."""
    assert list(typing.get_args(SchedulerName)) == list(SCHEDULERS)


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match=r"available: .*'ddim'.*'dpmpp_2m'"):
        make_scheduler("plms", {})


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - FLOW_SCHEDULERS))
@pytest.mark.parametrize("config", ["sd15", "linear_trailing"])
def test_builds_each_name_like_diffusers_from_config(check_parity, configs, name, config):
    reference_cls, noise_module = REFERENCES[name]
    ours = make_scheduler(name, configs[config])
    reference = reference_cls.from_config(configs[config])
    seeds = [1, 2] if noise_module else None
    check_parity(ours, reference, 8, seeds=seeds, diffusers_module=noise_module)


def test_ddim_from_an_euler_config(check_parity, configs):
    """A config saved by another scheduler class: its defaults (`_use_default_values`) do not leak."""
    euler_config = dict(diffusers.EulerDiscreteScheduler.from_config(configs["sd15"]).config)
    assert euler_config["timestep_spacing"] == "linspace"  # Euler's default, listed in _use_default_values
    ours = make_scheduler("ddim", euler_config)
    assert ours.config.timestep_spacing == "leading"  # DDIM's default
    assert (ours.config.steps_offset, ours.config.set_alpha_to_one) == (1, False)  # from the model's config
    check_parity(ours, diffusers.DDIMScheduler.from_config(euler_config), 10)


def test_dpmpp_2m_pins_its_algorithm(check_parity, configs):
    config = {**configs["sd15"], "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}
    ours = make_scheduler("dpmpp_2m", config)
    pinned = (ours.config.algorithm_type, ours.config.solver_order, ours.config.solver_type)
    assert pinned == ("dpmsolver++", 2, "midpoint")
    reference = diffusers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"
    )
    check_parity(ours, reference, 10)


def test_overrides_win(configs):
    assert make_scheduler("dpmpp_2m", configs["sd15"], use_karras_sigmas=True).config.use_karras_sigmas is True
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("euler", {**configs["sd15"], "prediction_type": "flow_prediction"})


def test_supported_schedulers_follow_what_the_config_allows():
    from services.schedulers import supported_schedulers

    # A DDPM config's "fixed_small" variance reaches DPM-Solver through from_config, where
    # diffusers ignores it: every scheduler can be built.
    ddpm = {"beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small", "clip_sample": True}
    assert supported_schedulers(ddpm) == ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "ddpm"]
    # A learned variance has no port in DPM-Solver here: a request cannot pick it.
    assert "dpmpp_2m" not in supported_schedulers({**ddpm, "variance_type": "learned_range"})


def test_flow_matching_and_noise_schedule_models_take_their_own_samplers(configs):
    """A beta-schedule sampler on a flow-matching model (or the reverse) would run without error
    and produce noise; the config's class decides which samplers a model offers."""
    flux = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": True}
    assert supported_schedulers(flux) == ["flow_match_euler"]
    assert "flow_match_euler" not in supported_schedulers(configs["sd15"])
    with pytest.raises(ValueError, match="cannot sample a flow-matching model"):
        make_scheduler("ddim", flux)
    with pytest.raises(ValueError, match="cannot sample a noise-schedule"):
        make_scheduler("flow_match_euler", configs["sd15"])
