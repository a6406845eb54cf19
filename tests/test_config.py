"""DEISConfig: diffusers' fields and defaults, validation, hashing, JSON round trips."""

import dataclasses
import inspect
import json
import math

import jax
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import DEISConfig
from deis_jax.config import DIFFUSERS_FIELDS


def test_fields_and_defaults_equal_diffusers_signature():
    diffusers = pytest.importorskip("diffusers")
    params = inspect.signature(diffusers.DEISMultistepScheduler.__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self"}
    ours = {f.name: f.default for f in dataclasses.fields(DEISConfig) if f.name in DIFFUSERS_FIELDS}
    assert ours == expected and set(DIFFUSERS_FIELDS) == set(expected)


def test_hashable_with_trained_betas_as_list_or_array():
    betas = np.linspace(1e-4, 0.02, 1000)
    a, b = DEISConfig(trained_betas=list(betas)), DEISConfig(trained_betas=betas)
    assert a == b and hash(a) == hash(b)
    assert isinstance(a.trained_betas, tuple)
    jax.jit(lambda x, c: x, static_argnums=1)(1.0, a)  # usable as a static argument


def test_diffusers_aliases_are_normalised():
    assert DEISConfig(algorithm_type="dpmsolver++").algorithm_type == "deis"
    assert DEISConfig(solver_type="midpoint").solver_type == "logrho"


@pytest.mark.parametrize("kwargs,field", [
    ({"solver_order": 4}, "solver_order"),
    ({"solver_order": 0}, "solver_order"),
    ({"solver_order": 2.0}, "solver_order"),
    ({"prediction_type": "x0"}, "prediction_type"),
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"beta_start": -0.1}, "beta_start"),
    ({"beta_end": 1.0}, "beta_end"),
    ({"beta_end": math.nan}, "beta_end"),
    ({"trained_betas": [0.1, -0.1] + [0.01] * 998}, "trained_betas"),
    ({"trained_betas": [1.0] + [0.01] * 999}, "trained_betas"),
    ({"trained_betas": [0.01] * 10}, "trained_betas"),
    ({"trained_betas": [math.nan] * 1000}, "trained_betas"),
    ({"trained_betas": [0.0] * 1000}, "trained_betas"),
    ({"beta_start": 0.0, "beta_end": 0.0}, "beta_end"),
    ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "use_karras_sigmas"),
    ({"use_beta_sigmas": True, "use_flow_sigmas": True}, "use_beta_sigmas"),
    ({"use_karras_sigmas": 1}, "use_karras_sigmas"),
    ({"dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio"),
    ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ({"sample_max_value": 0.0}, "sample_max_value"),
    ({"flow_shift": 0.0}, "flow_shift"),
    ({"flow_shift": -1.0}, "flow_shift"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"steps_offset": -1}, "steps_offset"),
    ({"algorithm_type": "sde"}, "algorithm_type"),
    ({"solver_type": "bh3"}, "solver_type"),
    ({"time_shift_type": "linear"}, "time_shift_type"),
    ({"num_train_timesteps": 1}, "num_train_timesteps"),
])
def test_bad_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DEISConfig(**kwargs)


def test_zero_terminal_snr_betas_accepted():
    betas = [0.01] * 999 + [1.0]
    assert DEISConfig(trained_betas=betas).trained_betas[-1] == 1.0


def test_from_diffusers_dict_path_and_warning(tmp_path):
    sd = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
          "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(sd))
    with pytest.warns(UserWarning, match="clip_sample.*set_alpha_to_one.*skip_prk_steps"):
        from_path = DEISConfig.from_diffusers(path)
    with pytest.warns(UserWarning):
        from_dict = DEISConfig.from_diffusers(sd)
    assert from_path == from_dict
    assert from_path.beta_schedule == "scaled_linear" and from_path.steps_offset == 1


def test_to_diffusers_round_trip():
    diffusers = pytest.importorskip("diffusers")
    config = DEISConfig(solver_order=3, trained_betas=np.linspace(1e-4, 0.02, 1000), use_karras_sigmas=True)
    sched = diffusers.DEISMultistepScheduler.from_config(config.to_diffusers())
    assert sched.config.solver_order == 3 and sched.config.use_karras_sigmas
    back = DEISConfig.from_diffusers(dict(sched.config))
    assert back == config
    json.dumps(config.to_diffusers())


def test_public_api():
    for name in dj.__all__:
        assert hasattr(dj, name)
    assert "logrho" in dj.SOLVER_TYPES and "trailing" in dj.TIMESTEP_SPACINGS


@pytest.mark.parametrize("kwargs,field", [
    ({"beta_start": 0.0}, "beta_start"),  # beta_0 = 0: sigma(t = 0) = 0 (NaN weights, log 0 before)
    ({"beta_start": 1e-9, "beta_schedule": "scaled_linear"}, "beta_start"),  # 1 - beta_0 rounds to 1 in float32
    ({"trained_betas": [0.0] + [0.01] * 999}, "trained_betas"),
    ({"beta_end": 0.5}, "beta_end"),  # alpha_bar underflows float32 long before t = 999: infinite sigmas
    ({"trained_betas": [0.5] * 999 + [1.0], "prediction_type": "v_prediction"}, "trained_betas"),
    ({"timestep_spacing": "leading", "steps_offset": 500}, "steps_offset"),  # every leading grid passes t = 999
    ({"use_flow_sigmas": True, "flow_shift": 1e6}, "flow_shift"),  # first flow sigma rounds to 1 (alpha = 0)
    ({"use_flow_sigmas": True, "flow_shift": 1e-50}, "flow_shift"),  # flow sigmas round to 0
])
def test_configs_without_a_usable_grid_are_rejected(kwargs, field):
    """Values each field accepts alone, whose schedule has no usable step grid for any step count:
    accepted before, then NaN weights, `math domain error` or infinite sigmas at set_timesteps."""
    with pytest.raises(ValueError, match=rf"DEISConfig\.{field}=.* is invalid"):
        DEISConfig(**kwargs)


def test_usable_grids_at_the_limits_are_accepted():
    DEISConfig(beta_start=1e-7, beta_schedule="scaled_linear")  # 1 - beta_0 < 1 in float32
    DEISConfig(beta_end=0.5, num_train_timesteps=50)
    DEISConfig(trained_betas=[0.01] * 999 + [1.0], prediction_type="v_prediction")
    DEISConfig(timestep_spacing="leading", steps_offset=499)  # N = 1: timestep 500 + 499 = 999
    DEISConfig(use_flow_sigmas=True, flow_shift=1e4)
    DEISConfig(use_flow_sigmas=True, flow_shift=1e-30)
