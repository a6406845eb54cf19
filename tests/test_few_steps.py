"""Issue 10, few steps: custom grids (`sigmas=` / `timesteps=`), `final_sigmas_type="zero"` (the last step
returns the denoised estimate) and `algorithm_type="data_prediction"`, each against an independent
reference: diffusers' DPMSolverMultistepScheduler run live, closed-form Gaussian flows, numpy formulas."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from helpers import (
    GAUSS_MEAN,
    GAUSS_STD,
    assert_float32_parity,
    dpmsolver_trajectory,
    gaussian_flow,
    initial_noise,
    relative_error,
    toy_model,
)
from test_reliability import _rescaled_zero_snr_betas
from test_variants import exact_gaussian_model, gaussian_error

SHAPE = (2, 3, 4)
# The linear betas 1e-4..0.02 in float64: alpha_bar, and the noise range rho(t = 0)..rho(t = 999).
ALPHA_BAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
RHO = np.sqrt((1 - ALPHA_BAR) / ALPHA_BAR)
GRID = (100.0, 10.0, 1.0, 0.1)  # a valid custom grid of 3 steps on the default schedule
FLOW = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
ZERO_SNR = {"trained_betas": tuple(_rescaled_zero_snr_betas()), "prediction_type": "v_prediction",
            "timestep_spacing": "trailing"}


def _alpha_sigma(config: dj.DEISConfig, s):
    """(alpha, sigma) at diffusers' sigma entry s: (1 - s, s) for flow, else rho = s (README)."""
    s = np.asarray(s, np.float64)
    if config.use_flow_sigmas:
        return 1 - s, s
    with np.errstate(over="ignore", invalid="ignore"):
        alpha = 1 / np.sqrt(1 + s * s)
        return alpha, np.where(np.isinf(s), 1.0, s * alpha)


def _denoised(config: dj.DEISConfig, s, x, m):
    """The model's x0 at diffusers' sigma entry s (numpy, float64), thresholded as Imagen does:
    per example, clip(quantile(|x0|, ratio), 1, max) = q, x0 <- clip(x0, -q, q) / q."""
    alpha, sigma = _alpha_sigma(config, s)
    x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
    x0 = {"epsilon": lambda: (x - sigma * m) / alpha, "sample": lambda: m,
          "v_prediction": lambda: alpha * x - sigma * m, "flow_prediction": lambda: x - s * m}[config.prediction_type]()
    if config.thresholding:
        flat = x0.reshape(x0.shape[0], -1)
        q = np.clip(np.quantile(np.abs(flat), config.dynamic_thresholding_ratio, axis=1), 1,
                    config.sample_max_value)[:, None]
        x0 = (np.clip(flat, -q, q) / q).reshape(x0.shape)
    return x0


def _step_sigmas(state: dj.DEISState) -> np.ndarray:
    """The solver's N + 1 step sigmas (rhork's `state.sigmas` also lists its stages: every S-th entry, and
    with a final step to 0 the last one, a single evaluation)."""
    s, per_step = np.asarray(state.sigmas, np.float64), state.config.evaluations_per_step
    return s if per_step == 1 else np.append(s[:-1:per_step], s[-1])


# --- 1. validation --------------------------------------------------------------------------------------

INVALID = [
    ("wrong length", {"num_inference_steps": 4, "sigmas": GRID},
     r"^sigmas has shape \(4,\): it must be 1-D with num_inference_steps \+ 1 = 5 entries"),
    ("2-D", {"sigmas": [GRID]}, r"^sigmas has shape \(1, 4\): it must be 1-D with N \+ 1 entries \(N steps"),
    ("one level", {"sigmas": [1.0]}, r"^sigmas has shape \(1,\): it must be 1-D"),
    ("not numbers", {"sigmas": ["a", "b"]}, r"^sigmas=\['a', 'b'\] is invalid: must be a 1-D array of numbers"),
    ("non-monotone", {"sigmas": [100.0, 1.0, 10.0, 0.1]},
     r"^sigmas=\[100.0, 1.0, 10.0, 0.1\] is invalid: must be finite.*, >= 0 and strictly decreasing"),
    ("repeated", {"sigmas": [100.0, 10.0, 10.0, 0.1]}, r"^sigmas=\[100.0, 10.0, 10.0, 0.1\] is invalid: must be"),
    ("negative", {"sigmas": [100.0, 10.0, 1.0, -0.5]}, r"^sigmas=\[100.0, 10.0, 1.0, -0.5\] is invalid: must be"),
    ("nan", {"sigmas": [100.0, np.nan, 1.0]}, r"^sigmas=\[100.0, nan, 1.0\] is invalid: must be finite"),
    ("inf", {"sigmas": [np.inf, 10.0, 1.0]}, r"^sigmas=\[inf, 10.0, 1.0\] is invalid: must be finite"),
    ("above the range", {"sigmas": [200.0, 10.0, 1.0]},
     r"^sigmas=\[200.0, 10.0, 1.0\] is invalid: every entry must lie in the schedule's range"),
    ("below the range", {"sigmas": [100.0, 10.0, 0.005]}, r"^sigmas=\[100.0, 10.0, 0.005\] is invalid: every entry"),
    ("below the range before 0", {"sigmas": [100.0, 0.005, 0.0]}, r"^sigmas=\[100.0, 0.005, 0.0\] is invalid: every"),
    ("both grids", {"sigmas": GRID, "timesteps": [999, 500, 10]}, r"^sigmas= and timesteps= are invalid together"),
    ("non-integer timesteps", {"timesteps": [999, 500.5, 10]},
     r"^timesteps=\[999, 500.5, 10\] is invalid: must be a 1-D array of num_inference_steps integers, strictly "
     r"decreasing, in 0\.\.999\.$"),
    ("bool timesteps", {"timesteps": [True, False]}, r"^timesteps=\[True, False\] is invalid"),
    ("timestep 1000", {"timesteps": [1000, 500]}, r"^timesteps=\[1000, 500\] is invalid: .* in 0\.\.999\.$"),
    ("negative timestep", {"timesteps": [500, -1]}, r"^timesteps=\[500, -1\] is invalid"),
    ("increasing timesteps", {"timesteps": [10, 500]}, r"^timesteps=\[10, 500\] is invalid"),
    ("repeated timesteps", {"timesteps": [500, 500, 10]}, r"^timesteps=\[500, 500, 10\] is invalid"),
    ("2-D timesteps", {"timesteps": [[999, 500]]}, r"^timesteps=\[\[999, 500\]\] is invalid"),
    ("timesteps of the wrong length", {"num_inference_steps": 2, "timesteps": [999, 500, 10]},
     r"^timesteps=\[999, 500, 10\] is invalid: must be a 1-D array of num_inference_steps integers"),
    ("timesteps ending at 0 with sigma_min", {"timesteps": [999, 500, 0]},
     r"^timesteps=\[999, 500, 0\] is invalid: .*final_sigmas_type='zero'"),
]


@pytest.mark.parametrize("name,kwargs,match", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_custom_grid_is_rejected(name, kwargs, match):
    kwargs = {"num_inference_steps": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        dj.set_timesteps(dj.DEISConfig(), shape=SHAPE, **kwargs)


@pytest.mark.parametrize("config,kwargs,match", [
    (dj.DEISConfig(final_sigmas_type="zero"), {"sigmas": GRID},
     r"^sigmas=\[100.0, 10.0, 1.0, 0.1\] is invalid with DEISConfig.final_sigmas_type='zero': the grid must end at 0"),
    (dj.DEISConfig(**FLOW), {"timesteps": [999, 500]}, r"^timesteps= is invalid for a continuous or flow schedule"),
    (dj.DEISConfig(time_schedule="vp_linear"), {"timesteps": [999, 500]}, r"^timesteps= is invalid for a continuous"),
    (dj.DEISConfig(use_flow_sigmas=True, use_dynamic_shifting=True), {"sigmas": [0.9, 0.5, 0.1]},
     r"^sigmas= / timesteps= are invalid with DEISConfig\(use_dynamic_shifting=True\)"),
    (dj.DEISConfig(**FLOW), {"sigmas": [1.0, 0.5, 0.1]},
     r"^sigmas=\[1.0, 0.5, 0.1\] is invalid: every entry must lie in the schedule's range \(0, 1\)"),
    (dj.DEISConfig(**FLOW), {"sigmas": [0.9, 1e-50, 0.0]},  # 0 in float32: eps = 0 / 0 there
     r"^sigmas=\[0.9, 1e-50, 0.0\] is invalid: every entry must lie in the schedule's range \(0, 1\)"),
    (dj.DEISConfig(time_schedule="vp_linear"), {"sigmas": [200.0, 1.0, 0.1]},
     r"^sigmas=\[200.0, 1.0, 0.1\] is invalid: every entry must lie in the schedule's range"),
], ids=["zero-needs-0", "flow-timesteps", "continuous-timesteps", "dynamic-shifting", "flow-s=1", "flow-s-underflows",
        "continuous-range"])
def test_invalid_custom_grid_for_the_config(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dj.set_timesteps(config, None, SHAPE, **kwargs)


def test_invalid_new_config_values():
    with pytest.raises(ValueError, match=r"^DEISConfig.final_sigmas_type='denoise_to_zero' is invalid: must be one of "
                                         r"\('sigma_min', 'zero'\)"):
        dj.DEISConfig(final_sigmas_type="denoise_to_zero")
    with pytest.raises(ValueError, match=r"^DEISConfig.algorithm_type='sde-dpmsolver\+\+' is invalid: must be one of "
                                         r"\('deis', 'data_prediction', 'dpmsolver', 'dpmsolver\+\+'\)"):
        dj.DEISConfig(algorithm_type="sde-dpmsolver++")
    assert dj.DEISConfig(algorithm_type="dpmsolver").algorithm_type == "deis"  # diffusers' rewrite, for parity


@pytest.mark.parametrize("entry", ["sample", "sample_from_noise", "img2img"])
def test_every_sampler_validates_the_grid(entry):
    noise, bad = jnp.zeros(SHAPE), [100.0, 1.0, 10.0, 0.1]
    calls = {"sample": lambda: dj.sample(toy_model, jax.random.key(0), SHAPE, sigmas=bad),
             "sample_from_noise": lambda: dj.sample_from_noise(toy_model, noise, sigmas=bad),
             "img2img": lambda: dj.img2img(toy_model, noise, noise, strength=0.5, sigmas=bad)}
    with pytest.raises(ValueError, match=r"^sigmas=\[100.0, 1.0, 10.0, 0.1\] is invalid"):
        calls[entry]()
    with pytest.raises(ValueError, match=r"^timesteps=\[10, 500\] is invalid"):
        {"sample": lambda: dj.sample(toy_model, jax.random.key(0), SHAPE, timesteps=[10, 500]),
         "sample_from_noise": lambda: dj.sample_from_noise(toy_model, noise, timesteps=[10, 500]),
         "img2img": lambda: dj.img2img(toy_model, noise, noise, strength=0.5, timesteps=[10, 500])}[entry]()


def test_a_traced_grid_is_rejected_by_name():
    """The grid shapes the static tables: a grid traced by jit is refused with a message saying so."""
    noise = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"^sigmas=.* is invalid: a custom grid must be concrete"):
        jax.jit(lambda z, s: dj.sample_from_noise(toy_model, z, sigmas=s))(noise, jnp.asarray(GRID))
    with pytest.raises(ValueError, match=r"^timesteps=.* is invalid: a custom grid must be concrete"):
        jax.jit(lambda z, t: dj.sample_from_noise(toy_model, z, timesteps=t))(noise, jnp.array([999, 500]))


def test_ends_within_one_percent_are_moved_onto_the_range_and_only_they():
    """README: ends within 1% of the schedule's range are moved onto it; inner levels are kept."""
    lo, hi = float(RHO[0]), float(RHO[-1])
    grid = [hi * 1.005, hi * 0.995, 10.0, lo * 1.005, lo * 0.995]
    state = dj.set_timesteps(dj.DEISConfig(), None, SHAPE, sigmas=grid)
    kept = np.asarray(state.grid_sigmas)
    np.testing.assert_array_equal(kept[1:-1], grid[1:-1])
    np.testing.assert_allclose(kept[[0, -1]], [hi, lo], rtol=1e-3)  # the float32 table's ends (RHO: float64)
    # beyond 1%, or an inner level outside too (the end is then kept: the message shows the grid as given)
    for bad in ([hi * 1.02, 10.0, 1.0], [hi * 1.005, hi * 1.002, 1.0], [10.0, lo * 0.999, lo * 0.995]):
        with pytest.raises(ValueError, match=rf"^sigmas={re.escape(str(bad))} is invalid: every entry must lie in "):
            dj.set_timesteps(dj.DEISConfig(), None, SHAPE, sigmas=bad)


# --- 2. a named grid passed back as a custom grid is the same grid --------------------------------------

NAMED = {
    "linspace": {},
    "karras": {"use_karras_sigmas": True},
    "flow": FLOW,
    "continuous": {"time_schedule": "vp_linear"},
}


def _repeats_its_last_sigma(config):
    """diffusers' flow and Karras grids (logrho) end with a zero-length step at sigma_min, which a
    strictly decreasing custom grid cannot hold."""
    return config.final_sigmas_type == "sigma_min" and (
        config.use_flow_sigmas or (config.use_karras_sigmas and config.solver_type == "logrho"))


@pytest.mark.parametrize("final", dj.FINAL_SIGMAS_TYPES)
@pytest.mark.parametrize("grid", NAMED)
@pytest.mark.parametrize("solver_type", dj.SOLVER_TYPES)
def test_named_grid_passed_back_is_the_same_grid(solver_type, grid, final):
    order = 2 if solver_type == "rhork" else 3
    config = dj.DEISConfig(solver_type=solver_type, solver_order=order, final_sigmas_type=final, **NAMED[grid])
    n, image = 7, jnp.asarray(initial_noise(SHAPE, seed=1))
    named = dj.set_timesteps(config, n, SHAPE)
    sigmas = _step_sigmas(named)
    if _repeats_its_last_sigma(config):
        assert sigmas[-1] == sigmas[-2]
        with pytest.raises(ValueError, match="strictly decreasing"):
            dj.set_timesteps(config, None, SHAPE, sigmas=sigmas)
        return
    custom = dj.set_timesteps(config, None, SHAPE, sigmas=sigmas)
    assert custom.requested_steps == n and custom.grid_sigmas is not None
    _assert_same_schedule(named, custom)
    begin = 3 * config.evaluations_per_step
    _assert_same_schedule(dj.set_begin_index(named, begin), dj.set_begin_index(custom, begin))

    noise = jnp.asarray(initial_noise(SHAPE))
    runs = [  # img2img starts at begin_index = 3 (S) too: N - int(0.6 N)
        (lambda **kw: dj.sample_from_noise(toy_model, noise, config=config, **kw)),
        (lambda **kw: dj.img2img(toy_model, image, noise, strength=0.6, config=config, **kw)),
    ]
    for run in runs:
        np.testing.assert_allclose(run(sigmas=sigmas), run(num_inference_steps=n), rtol=2e-5, atol=2e-5)


def _assert_same_schedule(named: dj.DEISState, custom: dj.DEISState):
    assert custom.begin_index == named.begin_index and int(custom.step_index) == int(named.step_index)
    if jnp.issubdtype(named.timesteps.dtype, jnp.integer):
        np.testing.assert_array_equal(custom.timesteps, named.timesteps)
    else:
        np.testing.assert_allclose(custom.timesteps, named.timesteps, rtol=1e-6)
    np.testing.assert_array_equal(custom.orders, named.orders)
    for name in ("sigmas", "alpha_t", "sigma_t", "a", "b", "weights"):
        np.testing.assert_allclose(getattr(custom, name), getattr(named, name), rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("solver_type", ["logrho", "rhork"])
def test_begin_index_and_img2img_keep_a_custom_grid(solver_type):
    """set_begin_index and img2img solve on the custom grid (not the config's named one): img2img equals the
    hand loop from begin_index = S (N - int(N strength)) on x = alpha x_image + sigma noise at that level."""
    config = dj.DEISConfig(solver_type=solver_type, solver_order=2, algorithm_type="data_prediction")
    sigmas = [120.0, 40.0, 9.0, 2.0, 0.5, 0.1, 0.02]
    state = dj.set_timesteps(config, None, SHAPE, sigmas=sigmas)
    begin = 2 * config.evaluations_per_step  # 6 - int(6 * 0.7)
    moved = dj.set_begin_index(state, begin)
    assert moved.grid_sigmas == state.grid_sigmas and moved.begin_index == begin
    levels = _step_sigmas(moved)  # logrho keeps the grid; rhork takes the training rhos of rounded timesteps
    np.testing.assert_allclose(levels, sigmas, rtol=1e-6 if solver_type == "logrho" else 0.1)
    image, noise = jnp.asarray(initial_noise(SHAPE, seed=1)), jnp.asarray(initial_noise(SHAPE))
    alpha, sigma = _alpha_sigma(config, levels[2])
    x = jnp.asarray(alpha * image + sigma * noise, jnp.float32)
    for t in moved.timesteps[begin:]:
        x, moved = dj.step(moved, toy_model(x, t), t, x)
    out = dj.img2img(toy_model, image, noise, strength=0.7, config=config, sigmas=sigmas)
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver_type", dj.SOLVER_TYPES)
def test_named_timesteps_passed_back_are_the_same_grid(solver_type):
    """`timesteps=` of a named grid's own timesteps, discrete VP: its training rhos, then the end."""
    for final in dj.FINAL_SIGMAS_TYPES:
        config = dj.DEISConfig(solver_type=solver_type, solver_order=2, final_sigmas_type=final,
                               timestep_spacing="leading", steps_offset=1)
        named = dj.set_timesteps(config, 6, SHAPE)
        timesteps = dj.set_timesteps(dataclasses.replace(config, solver_type="logrho"), 6, SHAPE).timesteps
        _assert_same_schedule(named, dj.set_timesteps(config, 6, SHAPE, timesteps=np.asarray(timesteps)))


# --- 3. order 1 equals diffusers' DPM-Solver, step by step ---------------------------------------------

DPM_GRIDS = {
    "linspace": {},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "scaled_linear-thresholding": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                   "thresholding": True, "sample_max_value": 1.5},
}


def _assert_dpmsolver_parity(kwargs: dict, algorithm: str, n, timesteps=None, solver_type="logrho"):
    """diffusers' DPMSolverMultistepScheduler(**kwargs) against DEISConfig(**kwargs) with our algorithm and
    solver types (diffusers' algorithm_type is rewritten to "deis"). Timesteps exactly, sigmas to float32
    rounding; every sample: float64 on the same sigma table to 1e-12, and float32 within diffusers' float32
    rounding of it (`assert_float32_parity`)."""
    x0 = initial_noise(SHAPE)
    config = dj.DEISConfig(**{**kwargs, "solver_type": solver_type, "algorithm_type": algorithm})
    with jax.enable_x64(True):
        state = dj.set_timesteps(config, n, x0.shape, dtype=jnp.float64, timesteps=timesteps)
        ours = _trajectory(state, x0.astype(np.float64))
    table = np.asarray(state.sigmas)
    ref_t, ref_sigmas, ref64 = dpmsolver_trajectory(kwargs, n, x0, timesteps=timesteps, sigma_table=table)
    if solver_type == "rhork":  # its model times are floats (interpolated in log rho)
        np.testing.assert_allclose(state.timesteps, ref_t, rtol=1e-7)
    else:
        np.testing.assert_array_equal(state.timesteps, ref_t)
    np.testing.assert_allclose(table, ref_sigmas, rtol=2.5e-7)  # both are float32 tables (1 ulp)
    # rhork's model times are interpolated in the float32 log rho table: 1e-5 off the integers, as the toy model sees
    assert relative_error(ours, ref64) <= (1e-8 if solver_type == "rhork" else 1e-12), relative_error(ours, ref64)
    _, _, ref32 = dpmsolver_trajectory(kwargs, n, x0, timesteps=timesteps)
    assert_float32_parity(_trajectory(dj.set_timesteps(config, n, x0.shape, timesteps=timesteps), x0), ref32, ref64)


def _trajectory(state: dj.DEISState, x: np.ndarray) -> np.ndarray:
    """Every sample of the jitted scan over `step` with the toy model: [E, *shape]."""
    def body(carry, t):
        x, state = carry
        x, state = dj.step(state, toy_model(x, t), t, x)
        return (x, state), x

    return np.asarray(jax.jit(lambda s, x: jax.lax.scan(body, (x, s), s.timesteps)[1])(state, jnp.asarray(x)))


@pytest.mark.parametrize("ours", dj.ALGORITHM_TYPES)
@pytest.mark.parametrize("algorithm,final", [("dpmsolver++", "zero"), ("dpmsolver", "sigma_min")])
@pytest.mark.parametrize("grid", DPM_GRIDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_order_one_equals_dpmsolver(prediction_type, grid, algorithm, final, ours):
    """At order 1 both forms are DDIM, the exact first-order exponential integrator, and so is DPM-Solver(++);
    diffusers supports final_sigmas_type='zero' only with dpmsolver++."""
    kwargs = dict(solver_order=1, prediction_type=prediction_type, final_sigmas_type=final, **DPM_GRIDS[grid])
    # One Karras step: diffusers' DEIS (our parity target, tests/test_parity_diffusers.py) repeats its one
    # sigma, sigma_max, where DPM-Solver appends sigma_min.
    for n in (10,) if grid == "karras" and final == "sigma_min" else (1, 10):
        _assert_dpmsolver_parity(dict(kwargs, algorithm_type=algorithm), ours, n)


@pytest.mark.parametrize("ours", dj.ALGORITHM_TYPES)
def test_order_one_flow_equals_dpmsolver(ours):
    kwargs = dict(solver_order=1, final_sigmas_type="zero", algorithm_type="dpmsolver++", **FLOW)
    for n in (1, 10):
        _assert_dpmsolver_parity(kwargs, ours, n)


AYS_SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Align Your Steps' SD 1.5 timesteps


@pytest.mark.parametrize("solver_type", dj.SOLVER_TYPES)
@pytest.mark.parametrize("ours", dj.ALGORITHM_TYPES)
@pytest.mark.parametrize("final", dj.FINAL_SIGMAS_TYPES)
def test_custom_timesteps_equal_dpmsolver(final, ours, solver_type):
    """`timesteps=` as diffusers' DPMSolverMultistepScheduler.set_timesteps(timesteps=...): the training rhos
    at those timesteps, then rho(t = 0) (sigma_min) or 0; at order 1 every solver type is DDIM."""
    timesteps = AYS_SD15 + [0] if final == "zero" else AYS_SD15
    kwargs = dict(solver_order=1, prediction_type="v_prediction", final_sigmas_type=final,
                  algorithm_type="dpmsolver++" if final == "zero" else "dpmsolver")
    _assert_dpmsolver_parity(kwargs, ours, None, timesteps=timesteps, solver_type=solver_type)


# --- 4. the last step to sigma 0 returns the denoised estimate --------------------------------------------

SCHEDULES = {
    "epsilon": {},
    "sample-thresholding": {"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5},
    "v-trailing": {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "v-karras": {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
    "flow-thresholding": {**FLOW, "thresholding": True, "sample_max_value": 1.5},
    "continuous": {"time_schedule": "vp_cosine"},
}
SOLVERS = [("logrho", 3), ("tab", 4), ("rhoab", 4), ("ipndm", 4), ("rhork", 3)]


def _last_step(state: dj.DEISState, x, model_fn=toy_model):
    """Eager steps until the last; returns (sample before it, its model output, the final sample)."""
    for t in state.timesteps[state.begin_index:-1]:
        x, state = dj.step(state, model_fn(x, t), t, x)
    m = model_fn(x, state.timesteps[-1])
    return x, m, dj.step(state, m, state.timesteps[-1], x)[0]


def _recording(model_fn):
    """model_fn, recording each call's (x, t, output) in order (a host callback, also inside jit and scan)."""
    calls = []

    def recorded(x, t):
        m = model_fn(x, t)
        jax.debug.callback(lambda *a: calls.append([np.asarray(v) for v in a]), x, t, m, ordered=True)
        return m

    return recorded, calls


def _big_model(x, t):
    """toy_model doubled: |x0| > 1 at the end for every prediction type, so that thresholding acts."""
    return 2 * toy_model(x, t)


@pytest.mark.parametrize("algorithm", dj.ALGORITHM_TYPES)
@pytest.mark.parametrize("schedule_name", SCHEDULES)
@pytest.mark.parametrize("solver_type,order", SOLVERS)
def test_final_step_returns_the_denoised_estimate(solver_type, order, schedule_name, algorithm):
    """The sampler's result is x0 of the last model call, from its input and output by the README's formulas
    (thresholded if thresholding); rhork's step to 0 is one evaluation: NFE = (N - 1) S + 1."""
    config = dj.DEISConfig(solver_type=solver_type, solver_order=order, algorithm_type=algorithm,
                           final_sigmas_type="zero", **SCHEDULES[schedule_name])
    thresholded = False
    with jax.enable_x64(True):
        noise = jnp.asarray(initial_noise(SHAPE).astype(np.float64))
        for n in (1, 4):
            state = dj.set_timesteps(config, n, SHAPE, dtype=jnp.float64)
            assert len(state.timesteps) == (n - 1) * config.evaluations_per_step + 1 and state.sigmas[-1] == 0
            model, calls = _recording(_big_model)
            out = dj.sample_from_noise(model, noise, config=config, num_inference_steps=n)
            jax.effects_barrier()
            assert len(calls) == len(state.timesteps)
            x, t, m = calls[-1]
            assert t == state.timesteps[-1]
            x0 = _denoised(config, state.sigmas[-2], x, m)
            np.testing.assert_allclose(out, x0, rtol=1e-13, atol=1e-13)
            raw = _denoised(dataclasses.replace(config, thresholding=False), state.sigmas[-2], x, m)
            thresholded |= not np.allclose(x0, raw)
    assert thresholded == config.thresholding


@pytest.mark.parametrize("solver_type,order", SOLVERS)
def test_begin_index_at_the_last_step_to_zero(solver_type, order):
    """The last step alone (set_begin_index, img2img with strength 1/N): x' = x0 of the model's output at
    the noised input, also for rhork, whose step to 0 is one evaluation at index (N - 1) S."""
    config = dj.DEISConfig(solver_type=solver_type, solver_order=order, final_sigmas_type="zero")
    n, per_step = 6, config.evaluations_per_step
    last = (n - 1) * per_step
    state = dj.set_timesteps(config, n, SHAPE)
    assert len(state.timesteps) == last + 1
    for bad in (last + 1, last + per_step) if per_step > 1 else (last + 1,):
        with pytest.raises(ValueError, match=f"^begin_index={bad} is invalid: must be an int in 0..{last}"):
            dj.set_begin_index(state, bad)
    image, noise = jnp.asarray(initial_noise(SHAPE, seed=1)), jnp.asarray(initial_noise(SHAPE))
    s, t = np.float64(state.sigmas[last]), state.timesteps[last]
    out = dj.sample_from_noise(toy_model, noise, config=config, num_inference_steps=n, begin_index=last)
    np.testing.assert_allclose(out, _denoised(config, s, noise, toy_model(noise, t)), rtol=1e-5, atol=1e-5)
    alpha, sigma = _alpha_sigma(config, s)
    noised = (alpha * image + sigma * noise).astype(np.float32)
    edited = dj.img2img(toy_model, image, noise, strength=1 / n, config=config, num_inference_steps=n)
    np.testing.assert_allclose(edited, _denoised(config, s, noised, toy_model(jnp.asarray(noised), t)),
                               rtol=1e-5, atol=1e-5)
    # one step earlier: a whole step (S evaluations for rhork), then the step to 0
    previous = dj.set_begin_index(state, last - per_step)
    assert len(previous.timesteps[previous.begin_index:]) == per_step + 1


@pytest.mark.parametrize("algorithm", dj.ALGORITHM_TYPES)
@pytest.mark.parametrize("order", [2, 3, 4])
def test_rhork_stages_at_the_step_ends_are_the_step_levels(order, algorithm):
    """A Runge-Kutta stage at c = 0 or 1 is evaluated at the step's own start or end level, exactly (in the data
    form the stages are placed in kappa = 1/rho, and 1/(1/rho) may miss rho by an ulp): the evaluation levels
    never rise, and the model's time there is the step's."""
    c = np.asarray(dj.config.RUNGE_KUTTA[order][0])
    for kwargs in ({}, {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}, FLOW,
                   {"time_schedule": "vp_linear", "use_karras_sigmas": True}):
        config = dj.DEISConfig(solver_type="rhork", solver_order=order, algorithm_type=algorithm, **kwargs)
        with jax.enable_x64(True):
            state = dj.set_timesteps(config, 9, SHAPE, dtype=jnp.float64)
        sigmas, t = np.asarray(state.sigmas), np.asarray(state.timesteps)
        assert (np.diff(sigmas) <= 0).all() and (np.diff(t) <= 0).all(), kwargs
        stage_sigmas, stage_t = sigmas[:-1].reshape(9, order), t.reshape(9, order)
        step_sigmas, step_t = np.append(stage_sigmas[:, 0], sigmas[-1]), stage_t[:, 0]
        np.testing.assert_array_equal(stage_sigmas[:, c == 1], np.broadcast_to(step_sigmas[1:, None], (9, 1)))
        np.testing.assert_array_equal(stage_t[:-1, c == 1], step_t[1:, None])


# --- 5. the data-prediction form: convergence orders, order 1 is DDIM ------------------------------------

DATA_ORDERS = [("logrho", 1), ("logrho", 2), ("logrho", 3), ("tab", 3), ("rhoab", 3), ("rhork", 2), ("rhork", 3)]


@pytest.mark.parametrize("variant,order", DATA_ORDERS)
def test_data_prediction_convergence_order(variant, order):
    """Gaussian data, exact eps, float64, steps uniform in log rho on vp_linear, against the closed-form flow
    (tests/test_variants.py's `gaussian_error`): the slope of log error vs log N reaches the order - 0.3."""
    config = dj.DEISConfig(solver_type=variant, solver_order=order, time_schedule="vp_linear",
                           use_exponential_sigmas=True, lower_order_final=False, algorithm_type="data_prediction")
    # tAB3's data-form error is small and changes sign near 60 steps: its slope is 1.2 at 40 -> 80, 2.5, 2.8 after
    steps = (160, 320) if variant == "tab" else (80, 160)
    errors = [gaussian_error(config, n) for n in steps]
    measured = -np.log(errors[1] / errors[0]) / np.log(2)
    assert measured >= order - 0.3, (errors, measured)


ORDER_ONE_GRIDS = {
    "linspace": {},
    "karras": {"use_karras_sigmas": True},
    "zero": {"final_sigmas_type": "zero", "prediction_type": "sample"},
    "thresholding": {"thresholding": True, "prediction_type": "v_prediction", "final_sigmas_type": "zero"},
    "flow": FLOW,
    "continuous": {"time_schedule": "vp_linear", "use_exponential_sigmas": True},
    "zero-snr": ZERO_SNR,
    "custom": {"final_sigmas_type": "zero"},
}


@pytest.mark.parametrize("solver_type,grid", [  # zero terminal SNR with v prediction: logrho, rhoab, ipndm only
    (s, g) for s in dj.SOLVER_TYPES for g in ORDER_ONE_GRIDS if g != "zero-snr" or s not in ("tab", "rhork")])
def test_order_one_data_form_equals_ddim(solver_type, grid):
    """x' = (sigma'/sigma) x + sigma' (1/rho' - 1/rho) x0 is (alpha'/alpha) x + alpha' (rho' - rho) eps when
    x = alpha x0 + sigma eps: the data form at order 1 is DDIM, also from rho = inf and to sigma = 0."""
    kwargs = ORDER_ONE_GRIDS[grid]
    sigmas = [100.0, 20.0, 3.0, 1.0, 0.3, 0.05, 0.0] if grid == "custom" else None
    n = None if grid == "custom" else 9
    with jax.enable_x64(True):
        noise = jnp.asarray(initial_noise(SHAPE).astype(np.float64))
        out = {algorithm: dj.sample_from_noise(toy_model, noise, num_inference_steps=n, sigmas=sigmas,
                                               config=dj.DEISConfig(solver_type=solver_type, solver_order=1,
                                                                    algorithm_type=algorithm, **kwargs))
               for algorithm in dj.ALGORITHM_TYPES}
    assert np.isfinite(out["deis"]).all()
    assert relative_error(np.asarray(out["data_prediction"])[None], np.asarray(out["deis"])[None]) <= 1e-12


# --- 6. combinations ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("final", dj.FINAL_SIGMAS_TYPES)
@pytest.mark.parametrize("solver_type", dj.SOLVER_TYPES)
def test_custom_grid_at_the_maximum_step_count(solver_type, final):
    """Every training timestep once: 999 steps ending at rho(t = 0), or 1000 steps when the last goes to 0
    (t = 0 is then an evaluation, not where the solve ends). One more step is refused, by the grid's name."""
    config = dj.DEISConfig(solver_type=solver_type, solver_order=2, final_sigmas_type=final)
    timesteps = np.arange(999, -1, -1) if final == "zero" else np.arange(999, 0, -1)
    n = len(timesteps)
    with jax.enable_x64(True):
        state = dj.set_timesteps(config, None, (16,), dtype=jnp.float64, timesteps=timesteps)
        per_step = config.evaluations_per_step
        assert len(state.timesteps) == (n - (final == "zero")) * per_step + (final == "zero")
        np.testing.assert_allclose(np.asarray(state.timesteps)[::per_step], timesteps, atol=1e-4)  # rhork: floats
        np.testing.assert_allclose(_step_sigmas(state)[:-1], RHO[timesteps], rtol=1e-3)  # neighbours: > 1% apart
        noise = jnp.asarray(np.random.RandomState(0).randn(16))
        out = dj.sample_from_noise(exact_gaussian_model(config), noise, config=config, timesteps=timesteps)
    # the exact flow to rho(t = 0), then (final zero) the exact denoiser there: E[x0 | x]
    rho1, rho0 = np.float64(state.sigmas[0]), np.float64(state.sigmas[-1 if final == "sigma_min" else -2])
    a, s = 1 / np.sqrt(1 + rho1**2), 1 / np.sqrt(1 + rho0**2)
    x = gaussian_flow(np.asarray(noise), a, rho1 * a, s, rho0 * s)
    if final == "zero":
        x = GAUSS_MEAN + s * GAUSS_STD**2 * (x - s * GAUSS_MEAN) / (s**2 * GAUSS_STD**2 + (rho0 * s) ** 2)
    np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-4)

    # logrho keeps the sigmas and may give the model a timestep twice (as for Karras sigmas): 1000 steps
    limit = 1000 if solver_type == "logrho" or final == "zero" else 999
    too_many = np.append(np.geomspace(RHO[-1], RHO[0], limit + 1 + (final == "sigma_min")),
                         [0.0] if final == "zero" else [])
    with pytest.raises(ValueError, match=rf"^sigmas has {limit + 1} steps: at most {limit}"):
        dj.set_timesteps(config, None, (16,), sigmas=too_many)


@pytest.mark.parametrize("solver_type", ["logrho", "rhoab", "ipndm"])
@pytest.mark.parametrize("algorithm", dj.ALGORITHM_TYPES)
def test_zero_terminal_snr_with_a_final_step_to_zero(solver_type, algorithm):
    """A trained schedule ending at alpha_bar = 0 with v prediction: one step from rho = inf straight to 0
    returns x0 = alpha x - sigma v = -v (alpha = 0); more steps stay finite and end on the denoised estimate,
    and the data form is the limit of schedules whose last alpha_bar tends to 0, as the eps form is."""
    config = dj.DEISConfig(solver_type=solver_type, solver_order=3, algorithm_type=algorithm,
                           final_sigmas_type="zero", **ZERO_SNR)
    noise = jnp.asarray(initial_noise(SHAPE))
    out = dj.sample_from_noise(toy_model, noise, config=config, num_inference_steps=1)
    np.testing.assert_allclose(out, -toy_model(noise, 999), rtol=1e-6, atol=1e-6)
    with jax.enable_x64(True):
        noise = noise.astype(jnp.float64)
        state = dj.set_timesteps(config, 8, SHAPE, dtype=jnp.float64)
        assert np.isinf(state.sigmas[0])
        x, m, out = _last_step(state, noise)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, _denoised(config, state.sigmas[-2], x, m), rtol=1e-12, atol=1e-12)
        gaps = []
        for floor in (1e-3, 1e-5, 1e-7):
            near = dataclasses.replace(config, trained_betas=tuple(_rescaled_zero_snr_betas(floor)))
            gaps.append(float(jnp.abs(dj.sample_from_noise(toy_model, noise, config=near, num_inference_steps=8)
                                      - out).max()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.4 * gaps[0], gaps


@pytest.mark.parametrize("solver_type,order", SOLVERS)
def test_half_precision_with_data_form_and_final_zero(solver_type, order):
    """float16 samples are updated in float32 and returned in float16 (README): the scan equals float32 steps
    on the float16 sample and model output, each result rounded to float16 (computing in float16 is off by
    up to 50% here)."""
    config = dj.DEISConfig(solver_type=solver_type, solver_order=order, algorithm_type="data_prediction",
                           final_sigmas_type="zero", thresholding=True, sample_max_value=2.0)
    sigmas = [80.0, 12.0, 2.5, 0.6, 0.1, 0.0]
    model = lambda x, t: toy_model(x.astype(jnp.float32), t).astype(x.dtype)  # noqa: E731
    x = noise = jnp.asarray(initial_noise(SHAPE), jnp.float16)
    out = dj.sample_from_noise(model, noise, config=config, sigmas=sigmas)
    assert out.dtype == jnp.float16 and bool(jnp.isfinite(out).all())
    state = dj.set_timesteps(config, None, SHAPE, sigmas=sigmas)  # float32
    for t in state.timesteps:
        x, state = dj.step(state, model(x, t).astype(jnp.float32), t, x.astype(jnp.float32))
        x = x.astype(jnp.float16)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(x, np.float32), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("algorithm", dj.ALGORITHM_TYPES)
def test_jit_and_vmap_with_a_custom_grid(algorithm):
    """The grid is static: jit traces once per grid and equals the eager call; vmap over noises equals the
    batched call; a grid given as a concrete jax array works like a list."""
    config = dj.DEISConfig(solver_order=3, algorithm_type=algorithm, final_sigmas_type="zero")
    sigmas = np.array([150.0, 30.0, 5.0, 1.0, 0.2, 0.03, 0.0])
    traces = []

    def model_fn(x, t):
        traces.append(None)
        return toy_model(x, t)

    noise = jnp.asarray(initial_noise((5, *SHAPE)))
    run = jax.jit(lambda z: dj.sample_from_noise(model_fn, z, config=config, sigmas=sigmas))
    first, second = run(noise), run(noise + 1.0)
    assert len(traces) == 1
    eager = dj.sample_from_noise(toy_model, noise, config=config, sigmas=jnp.asarray(sigmas))
    tol = dict(rtol=1e-5, atol=1e-6 * float(jnp.abs(eager).max()))
    np.testing.assert_allclose(first, eager, **tol)
    np.testing.assert_allclose(second, dj.sample_from_noise(toy_model, noise + 1.0, config=config, sigmas=sigmas),
                               **tol)
    vmapped = jax.vmap(lambda z: dj.sample_from_noise(toy_model, z, config=config, sigmas=sigmas))(noise)
    np.testing.assert_allclose(vmapped, eager, **tol)
    key = jax.random.key(3)
    np.testing.assert_allclose(jax.jit(lambda k: dj.sample(toy_model, k, SHAPE, config=config, sigmas=sigmas))(key),
                               dj.sample(toy_model, key, SHAPE, config=config, sigmas=sigmas), **tol)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_thresholding_with_the_data_form(order):
    """The data form extrapolates the thresholded x0: with sample_max_value = 1 and a final step to 0 the
    result lies in [-1, 1]; at order 1 it is DDIM on the thresholded x0 (the eps form's result)."""
    kwargs = dict(solver_order=order, thresholding=True, sample_max_value=1.0, final_sigmas_type="zero",
                  prediction_type="sample")
    noise = jnp.asarray(3 * initial_noise((2, 3, 4, 4)))
    out = {a: dj.sample_from_noise(lambda x, t: 2 * toy_model(x, t), noise, num_inference_steps=8,
                                   config=dj.DEISConfig(algorithm_type=a, **kwargs)) for a in dj.ALGORITHM_TYPES}
    assert float(jnp.abs(out["data_prediction"]).max()) <= 1.0
    unthresholded = dj.DEISConfig(algorithm_type="data_prediction", **{**kwargs, "thresholding": False})
    raw = dj.sample_from_noise(lambda x, t: 2 * toy_model(x, t), noise, num_inference_steps=8, config=unthresholded)
    assert float(jnp.abs(raw).max()) > 1.2  # thresholding was active
    if order == 1:
        np.testing.assert_allclose(out["data_prediction"], out["deis"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver_type", ["logrho", "rhoab", "ipndm"])
@pytest.mark.parametrize("final", dj.FINAL_SIGMAS_TYPES)
def test_zero_terminal_snr_grid_passed_back(final, solver_type):
    """A zero-terminal-SNR schedule's named grid starts at sigma = inf (timestep 999): as `sigmas=` and as
    `timesteps=` it is the same grid; inf is refused where the schedule has no zero terminal SNR."""
    config = dj.DEISConfig(solver_type=solver_type, solver_order=3, final_sigmas_type=final, **ZERO_SNR)
    named = dj.set_timesteps(config, 6, SHAPE)
    assert np.isinf(named.sigmas[0]) and int(named.timesteps[0]) == 999
    noise = jnp.asarray(initial_noise(SHAPE))
    expected = dj.sample_from_noise(toy_model, noise, config=config, num_inference_steps=6)
    for grid in ({"sigmas": np.asarray(named.sigmas)}, {"timesteps": np.asarray(named.timesteps)}):
        _assert_same_schedule(named, dj.set_timesteps(config, None, SHAPE, **grid))
        np.testing.assert_allclose(dj.sample_from_noise(toy_model, noise, config=config, **grid), expected,
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^sigmas=\[inf, 10.0, 0.0\] is invalid: must be finite"):
        dj.set_timesteps(dataclasses.replace(config, prediction_type="epsilon"), None, SHAPE, sigmas=[np.inf, 10, 0])
