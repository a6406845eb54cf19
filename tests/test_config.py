"""DEISConfig: diffusers' fields and defaults, validation, hashing, JSON round trips."""

import dataclasses
import inspect
import json
import math
import warnings

import jax
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import DEISConfig
from deis_jax.config import DIFFUSERS_FIELDS, MAX_SOLVER_ORDER
from helpers import SD15


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
    ({"dynamic_thresholding_ratio": -1e-9}, "dynamic_thresholding_ratio"),
    ({"dynamic_thresholding_ratio": 1 + 1e-9}, "dynamic_thresholding_ratio"),
    ({"thresholding_batch_axes": -1}, "thresholding_batch_axes"),
    ({"thresholding_batch_axes": 1.0}, "thresholding_batch_axes"),
    ({"thresholding_batch_axes": True}, "thresholding_batch_axes"),
    ({"sample_max_value": 0.0}, "sample_max_value"),
    ({"flow_shift": 0.0}, "flow_shift"),
    ({"flow_shift": -1.0}, "flow_shift"),
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


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_thresholding_ratio_end_points_accepted(ratio):
    """diffusers runs both: torch.quantile at 0 is the minimum, at 1 the maximum."""
    assert DEISConfig(thresholding=True, dynamic_thresholding_ratio=ratio).dynamic_thresholding_ratio == ratio


def test_thresholding_batch_axes_default_and_not_a_diffusers_field():
    assert DEISConfig().thresholding_batch_axes == 1
    assert DEISConfig(thresholding_batch_axes=0).thresholding_batch_axes == 0
    assert "thresholding_batch_axes" not in DIFFUSERS_FIELDS
    assert "thresholding_batch_axes" not in DEISConfig(thresholding_batch_axes=2).to_diffusers()


@pytest.mark.parametrize("schedule,t_max", [("vp_cosine", 0.9946), ("vp_linear", 1.0)])
def test_t_max_upper_end_point_accepted(schedule, t_max):
    assert DEISConfig(time_schedule=schedule, t_max=t_max).t_max == t_max


@pytest.mark.parametrize("schedule,t_max,interval", [
    ("vp_cosine", 0.9947, r"\(0.001, 0.9946\]"),
    ("vp_cosine", 1.0, r"\(0.001, 0.9946\]"),
    ("vp_linear", 1.0 + 1e-9, r"\(0.001, 1.0\]"),
])
def test_t_max_beyond_schedule_limit_rejected(schedule, t_max, interval):
    """Near t = 1 the cosine schedule's rho = sigma/alpha explodes (1.6e16 at t = 1) and accuracy collapses."""
    with pytest.raises(ValueError, match=rf"t_max={t_max!r}.*{interval}.*{schedule}"):
        DEISConfig(time_schedule=schedule, t_max=t_max)

def _below(x):
    return float(np.nextafter(x, -math.inf))


def _above(x):
    return float(np.nextafter(x, math.inf))


def _betas(first=0.01, middle=0.01, last=0.01):
    return [first] + [middle] * 998 + [last]


CONTINUOUS = {"time_schedule": "vp_linear"}
FLOAT32_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
# (fixed fields, field, values accepted at or just inside each end, values rejected just outside)
RANGES = [
    ({}, "num_train_timesteps", [2], [1, 0]),
    # Two training timesteps: a beta just below 1 keeps alpha_bar > 0 (over 1000 it underflows: test_edge_cases).
    # The betas are used in float32: the largest float32 below 1 is accepted, float64's rounds to 1 and is not.
    # beta_0 must keep 1 - beta_0 < 1 in float32 (sigma(t = 0) > 0): 2**-24 is the smallest float32 that does.
    ({"num_train_timesteps": 2}, "beta_start", [2.0**-24, FLOAT32_BELOW_ONE],
     [0.0, 2.0**-26, _below(0.0), -0.1, _below(1.0), 1.0, math.nan, math.inf]),
    ({"num_train_timesteps": 2}, "beta_end", [0.0, FLOAT32_BELOW_ONE], [_below(0.0), 1.0, math.nan, math.inf]),
    ({}, "trained_betas",
     [_betas(first=2.0**-24), _betas(middle=0.0), [0.01] * 500 + [FLOAT32_BELOW_ONE] + [0.01] * 499, _betas(last=1.0)],
     [_betas(first=0.0), _betas(first=_below(0.0)), _betas(middle=-0.1), _betas(first=1.0), _betas(middle=1.0),
      _betas(middle=_below(1.0)), _betas(last=_above(1.0)), _betas(middle=math.nan), _betas(last=math.inf)]),
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


# Non-default settings per scheduler, including settings DEIS does not have and diffusers' aliases.
CUSTOM = {
    "DDIMScheduler": {"clip_sample": True, "set_alpha_to_one": True, "prediction_type": "v_prediction",
                      "timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "thresholding": True,
                      "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0},
    "DDPMScheduler": {"variance_type": "learned_range", "clip_sample_range": 2.0,
                      "beta_schedule": "squaredcos_cap_v2", "steps_offset": 1},
    "PNDMScheduler": {"skip_prk_steps": True, "prediction_type": "v_prediction", "timestep_spacing": "linspace",
                      "beta_schedule": "scaled_linear"},
    "EulerDiscreteScheduler": {"interpolation_type": "log_linear", "use_karras_sigmas": True,
                               "timestep_type": "continuous", "sigma_min": 0.01, "final_sigmas_type": "sigma_min",
                               "prediction_type": "v_prediction"},
    "DPMSolverMultistepScheduler": {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": 3,
                                    "use_karras_sigmas": True, "euler_at_final": True, "lambda_min_clipped": -5.1,
                                    "lower_order_final": False},
    "DPMSolverSinglestepScheduler": {"algorithm_type": "dpmsolver++", "solver_type": "heun",
                                     "lower_order_final": False, "use_exponential_sigmas": True},
    "UniPCMultistepScheduler": {"solver_type": "bh1", "disable_corrector": [0], "use_flow_sigmas": True,
                                "flow_shift": 3.0, "prediction_type": "flow_prediction",
                                "timestep_spacing": "trailing"},
}


def _source_scheduler(name, variant):
    cls = getattr(pytest.importorskip("diffusers"), name)
    return {"default": cls, "sd15": lambda: cls.from_config(SD15), "custom": lambda: cls(**CUSTOM[name])}[variant]()


def _quiet_from_diffusers(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return DEISConfig.from_diffusers(config)


@pytest.mark.parametrize("variant", ["default", "sd15", "custom"])
@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_from_diffusers_equals_diffusers_from_config(name, variant, tmp_path):
    """Field by field what `DEISMultistepScheduler.from_config` builds from another scheduler's config:
    keys in `_use_default_values` (the source class's own defaults) are dropped, so DEIS's defaults
    apply; a saved scheduler_config.json has no such list, so there every key counts. Same timesteps."""
    diffusers = pytest.importorskip("diffusers")
    source = _source_scheduler(name, variant)
    source.save_config(tmp_path)
    cases = [(source.config, diffusers.DEISMultistepScheduler.from_config(source.config)),
             (tmp_path / "scheduler_config.json", diffusers.DEISMultistepScheduler.from_pretrained(tmp_path))]
    for config, ref in cases:
        ours = _quiet_from_diffusers(config)
        for field in DIFFUSERS_FIELDS:
            want = ref.config[field]
            want = tuple(want) if field == "trained_betas" and want is not None else want
            assert getattr(ours, field) == want, (field, str(config)[:60])
        ref.set_timesteps(25)
        state = dj.set_timesteps(ours, 25, (1, 4))
        np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())


def test_from_diffusers_stable_diffusion_defaults():
    """The issue's two cases: SD 1.5's PNDM config gives linspace spacing, DPMSolverSinglestep's
    default config lower_order_final=True (its own default False is not carried over)."""
    assert _quiet_from_diffusers(_source_scheduler("PNDMScheduler", "sd15").config).timestep_spacing == "linspace"
    single = _source_scheduler("DPMSolverSinglestepScheduler", "default").config
    assert _quiet_from_diffusers(single).lower_order_final is True


def test_from_diffusers_dict_and_path_agree(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15))
    from_path = DEISConfig.from_diffusers(path)
    assert from_path == DEISConfig.from_diffusers(str(path)) == DEISConfig.from_diffusers(SD15)
    assert from_path.beta_schedule == "scaled_linear" and from_path.steps_offset == 1


def test_from_diffusers_quiet_about_other_samplers_settings(tmp_path):
    """Sampler options of other diffusers schedulers (SD's clip_sample, set_alpha_to_one, skip_prk_steps),
    and model settings at their neutral value, are dropped without a warning, as diffusers does."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DEISConfig.from_diffusers(SD15)
        for name in CUSTOM:
            source = _source_scheduler(name, "default")
            DEISConfig.from_diffusers(source.config)
            source.save_config(tmp_path)
            DEISConfig.from_diffusers(tmp_path / "scheduler_config.json")  # has rescale_betas_zero_snr=False


@pytest.mark.parametrize("extra,key", [
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),  # changes the model's betas
    ({"timestep_type": "continuous"}, "timestep_type"),            # changes the model's timestep input
    ({"solver_ordr": 3}, "solver_ordr"),                            # not a diffusers scheduler setting
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "shift"),
])
def test_from_diffusers_warns_about_ignored_keys_that_matter(extra, key):
    with pytest.warns(UserWarning, match=rf"ignores .*'{key}'"):
        config = DEISConfig.from_diffusers({**SD15, **extra})
    assert config == DEISConfig.from_diffusers(SD15)


def test_from_diffusers_rejects_bad_use_default_values():
    with pytest.raises(ValueError, match="_use_default_values"):
        DEISConfig.from_diffusers({"_use_default_values": "timestep_spacing"})


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
