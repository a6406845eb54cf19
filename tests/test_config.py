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
from deis_jax.config import DIFFUSERS_FIELDS, MAX_SOLVER_ORDER


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
    ({"solver_order": 2.0}, "solver_order"),
    ({"prediction_type": "x0"}, "prediction_type"),
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"trained_betas": [0.01] * 10}, "trained_betas"),
    ({"trained_betas": [0.0] * 1000}, "trained_betas"),
    ({"beta_start": 0.0, "beta_end": 0.0}, "beta_end"),
    ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "use_karras_sigmas"),
    ({"use_beta_sigmas": True, "use_flow_sigmas": True}, "use_beta_sigmas"),
    ({"use_karras_sigmas": 1}, "use_karras_sigmas"),
    ({"dynamic_thresholding_ratio": 0.0}, "dynamic_thresholding_ratio"),
    ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"algorithm_type": "sde"}, "algorithm_type"),
    ({"solver_type": "bh3"}, "solver_type"),
    ({"time_shift_type": "linear"}, "time_shift_type"),
    ({"time_schedule": "vp_linear", "trained_betas": [0.01] * 1000}, "time_schedule"),
])
def test_bad_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DEISConfig(**kwargs)


def _below(x):
    return float(np.nextafter(x, -math.inf))


def _above(x):
    return float(np.nextafter(x, math.inf))


def _betas(first=0.01, middle=0.01, last=0.01):
    return [first] + [middle] * 998 + [last]


CONTINUOUS = {"time_schedule": "vp_linear"}
# (fixed fields, field, values accepted at or just inside each end, values rejected just outside)
RANGES = [
    ({}, "num_train_timesteps", [2], [1, 0]),
    ({}, "beta_start", [0.0, _below(1.0)], [_below(0.0), -0.1, 1.0, math.nan, math.inf]),
    ({}, "beta_end", [0.0, _below(1.0)], [_below(0.0), 1.0, math.nan, math.inf]),
    ({}, "trained_betas", [_betas(first=0.0), _betas(middle=0.0), _betas(middle=_below(1.0)), _betas(last=1.0)],
     [_betas(first=_below(0.0)), _betas(middle=-0.1), _betas(first=1.0), _betas(middle=1.0),
      _betas(last=_above(1.0)), _betas(middle=math.nan), _betas(last=math.inf)]),
    ({}, "sample_max_value", [_above(0.0), 1e300], [0.0, _below(0.0), math.inf, math.nan]),
    ({}, "flow_shift", [_above(0.0), 1e300], [0.0, -1.0, math.inf, math.nan]),
    ({}, "steps_offset", [0], [-1]),
    *[({"solver_type": kind}, "solver_order", [1, top], [0, top + 1]) for kind, top in MAX_SOLVER_ORDER.items()],
    (CONTINUOUS, "continuous_beta_min", [0.0, 19.9], [_below(0.0), math.inf]),
    ({**CONTINUOUS, "continuous_beta_min": 0.5}, "continuous_beta_max", [_above(0.5)], [0.5, _below(0.5), math.inf]),
    (CONTINUOUS, "t_min", [_above(0.0), 0.5, _below(1.0)], [0.0, _below(0.0), 1.0]),
    ({**CONTINUOUS, "t_min": 0.5}, "t_max", [_above(0.5), 1.0], [0.5, _below(0.5), _above(1.0)]),
]


@pytest.mark.parametrize("fixed,field,accepted,rejected", RANGES,
                         ids=[f"{field}-{fixed.get('solver_type', '')}" for fixed, field, _, _ in RANGES])
def test_numeric_ranges_accept_their_end_points_and_reject_just_outside(fixed, field, accepted, rejected):
    for value in accepted:
        config = DEISConfig(**fixed, **{field: value})
        assert getattr(config, field) == (tuple(value) if field == "trained_betas" else value)
    for value in rejected:
        with pytest.raises(ValueError, match=f"DEISConfig.{field}="):
            DEISConfig(**fixed, **{field: value})


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
