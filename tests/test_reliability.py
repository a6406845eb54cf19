"""Reliability: zero terminal SNR, low precision, extreme step counts, determinism, random configs."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import deis_jax as dj
from deis_jax import schedule
from helpers import (
    assert_float32_parity,
    deis_trajectory,
    diffusers_trajectory,
    gaussian_eps_model,
    initial_noise,
    toy_model,
)


def _rescaled_zero_snr_betas(floor=0.0, num_train_timesteps=1000):
    """Lin et al. (2023) "rescale betas to zero SNR" on the linear schedule; `floor` > 0 keeps
    the last alpha_bar at floor**2 instead of 0."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1 - np.linspace(1e-4, 0.02, num_train_timesteps)))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first - floor) / (first - last) + floor
    alphas_bar = alphas_bar_sqrt**2
    return 1 - np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("solver_type", ["logrho", "rhoab", "ipndm"])
def test_zero_terminal_snr_is_the_exact_limit(prediction_type, solver_type):
    """The first step starts at sigma = inf (alpha = 0); it is DDIM's limit x' = alpha' x0 + sigma' eps,
    and later steps do not interpolate through the node at infinity (iPNDM's fixed weights do not
    need node positions and keep it). The result is finite and is the limit of schedules whose
    last alpha_bar tends to 0."""
    betas = _rescaled_zero_snr_betas()
    assert betas[-1] == 1.0
    config = dj.DEISConfig(trained_betas=betas, prediction_type=prediction_type, solver_type=solver_type,
                           solver_order=3)
    state = dj.set_timesteps(config, 12, (2, 6))
    assert np.isinf(np.asarray(state.sigmas)[0])
    noise = jnp.asarray(initial_noise((2, 6)))
    assert np.isfinite(dj.sample_from_noise(toy_model, noise, config=config, num_inference_steps=12)).all()
    with jax.enable_x64(True):  # near zero SNR a float32 first step cancels catastrophically: compare in float64
        noise = noise.astype(jnp.float64)
        exact = dj.sample_from_noise(toy_model, noise, config=config, num_inference_steps=12)
        gaps = []
        for floor in (1e-3, 1e-5, 1e-7):
            near = dataclass_replace(config, trained_betas=_rescaled_zero_snr_betas(floor))
            gaps.append(float(jnp.abs(dj.sample_from_noise(toy_model, noise, config=near, num_inference_steps=12)
                                      - exact).max()))
    # log-rho weights of the node at rho_0 = 1/floor vanish like 1 / log(rho_0 / rho_1): slowly
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.4 * gaps[0], gaps


def dataclass_replace(config, **kwargs):
    fields = {k: getattr(config, k) for k in config.__dataclass_fields__}
    fields.update(kwargs)
    return dj.DEISConfig(**fields)


def test_zero_terminal_snr_with_epsilon_prediction_is_clamped():
    """x0 = (x - sigma eps) / alpha is undefined at alpha = 0: alpha_bar is clamped to 2**-24."""
    config = dj.DEISConfig(trained_betas=_rescaled_zero_snr_betas(), prediction_type="epsilon")
    assert schedule.alphas_cumprod(config)[-1] == np.float32(2.0**-24)
    out = dj.sample(lambda x, t: 0.1 * x, jax.random.key(0), (2, 3), config=config, num_inference_steps=10)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("solver_type", ["tab", "rhork"])
def test_zero_snr_rejected_for_solvers_without_the_exact_first_step(solver_type, prediction_type):
    betas = _rescaled_zero_snr_betas()
    with pytest.raises(ValueError, match=f"solver_type='{solver_type}'"):
        dj.DEISConfig(trained_betas=betas, prediction_type=prediction_type, solver_type=solver_type)
    # epsilon prediction clamps the last alpha_bar instead, which every solver can take
    config = dj.DEISConfig(trained_betas=betas, solver_type=solver_type)
    assert np.isfinite(dj.sample(toy_model, jax.random.key(0), (2, 3), config=config, num_inference_steps=6)).all()


def test_zero_terminal_snr_clamp_keeps_the_noise_levels_monotone():
    """Lin et al.'s rescaled betas put alpha_bar below 2**-24 already at t = 996..998 (rho up to 15406), so
    clamping only the last entry (diffusers' Euler does) would make sigma(999) = 4096 the lower one: a
    trailing grid's first step would climb from 4096 to 15406. Every alpha_bar is clamped to >= 2**-24."""
    config = dj.DEISConfig(trained_betas=_rescaled_zero_snr_betas(), prediction_type="epsilon",
                           timestep_spacing="trailing")
    exact = np.cumprod(1 - np.asarray(config.trained_betas, np.float64))
    assert np.sum(exact < 2.0**-24) == 4  # t = 996..999
    np.testing.assert_array_equal(schedule.alphas_cumprod(config)[-4:], np.float32(2.0**-24))
    assert np.all(np.diff(schedule.train_rhos(config)) >= 0)
    sigmas = np.asarray(dj.set_timesteps(config, 1000, (1,)).sigmas)
    assert np.all(np.diff(sigmas) <= 0) and sigmas[0] == pytest.approx(4096.0, rel=1e-6)


def test_rho_at_on_a_zero_terminal_snr_schedule():
    """rho_at is the training rho at every timestep (finite up to N - 2), inf past N - 2, also with
    jax.numpy (whose interp gave 0 * inf = NaN at t = N - 2, next to the node at infinity)."""
    config = dj.DEISConfig(trained_betas=_rescaled_zero_snr_betas(), prediction_type="v_prediction")
    rhos = schedule.train_rhos(config)
    t = np.arange(1000.0)
    np.testing.assert_allclose(schedule.rho_at(config, t), rhos, rtol=1e-6)
    np.testing.assert_allclose(schedule.rho_at(config, jnp.asarray(t), xp=jnp), rhos, rtol=1e-5)
    assert np.all(np.isinf(schedule.rho_at(config, jnp.array([998.5, 999.0]), xp=jnp)))


def _gaussian_model(config, prediction_type):
    """The exact model for Gaussian data, as the given prediction type, in the sample's dtype."""
    eps_fn, ac = gaussian_eps_model(config), jnp.asarray(schedule.alphas_cumprod(config))

    def model_fn(x, t):
        x32 = x.astype(jnp.float32)
        eps = eps_fn(x32, t)
        alpha, sigma = jnp.sqrt(ac[t]), jnp.sqrt(1 - ac[t])
        x0 = (x32 - sigma * eps) / alpha
        out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]
        return out.astype(x.dtype)

    return model_fn


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction", "flow_prediction"])
def test_low_precision_25_steps_stay_finite(dtype, order, prediction_type):
    """bfloat16/float16 samples: float32 arithmetic inside, the input dtype out, finite; with the
    exact Gaussian model, within half-precision rounding of the float32 run."""
    if prediction_type == "flow_prediction":
        config = dj.DEISConfig(solver_order=order, prediction_type=prediction_type, use_flow_sigmas=True)
        model = lambda x, t: (0.5 * jnp.tanh(x)).astype(x.dtype)  # noqa: E731
    else:
        config = dj.DEISConfig(solver_order=order, prediction_type=prediction_type)
        model = _gaussian_model(config, prediction_type)
    noise = jax.random.normal(jax.random.key(0), (2, 4, 4), dtype)
    out = dj.sample_from_noise(model, noise, config=config, num_inference_steps=25)
    ref = dj.sample_from_noise(model, noise.astype(jnp.float32), config=config, num_inference_steps=25)
    assert out.dtype == dtype and bool(jnp.isfinite(out).all())
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.05 * float(jnp.abs(ref).max())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_few_steps_with_order_three(n):
    x0 = initial_noise((2, 3))
    _, traj = deis_trajectory(dj.DEISConfig(solver_order=3), n, x0)
    assert traj.shape == (n, 2, 3) and np.isfinite(traj).all()


def test_a_thousand_steps():
    config = dj.DEISConfig(solver_order=3, timestep_spacing="trailing")
    state = dj.set_timesteps(config, 1000, (2,))
    assert state.num_inference_steps == 1000 and (np.diff(np.asarray(state.timesteps)) == -1).all()
    assert np.isfinite(dj.sample(toy_model, jax.random.key(0), (2,), config=config, num_inference_steps=1000)).all()


def test_deterministic_across_calls_and_jit():
    run = lambda: dj.sample(toy_model, jax.random.key(7), (2, 3), num_inference_steps=15,  # noqa: E731
                            config=dj.DEISConfig(solver_order=3))
    a, b, c = run(), run(), jax.jit(run)()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_model_output_dtype_mismatch():
    with pytest.raises(ValueError, match=r"^model_output.dtype=bfloat16 must equal sample.dtype=float32 \(cast"):
        dj.sample(lambda x, t: x.astype(jnp.bfloat16), jax.random.key(0), (2, 3), num_inference_steps=5)


# --- random configurations: accept what diffusers accepts (and match it), reject with ValueError otherwise.
# Documented rejections of values diffusers accepts silently (see README "Errors and edge cases").
DOCUMENTED_STRICTER = ("use_flow_sigmas", "solver_order", "dynamic_thresholding_ratio", "beta_start",
                       "beta_end", "sample_max_value", "flow_shift", "num_inference_steps")

CONFIGS = st.fixed_dictionaries({
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "cosine"]),
    "beta_start": st.sampled_from([0.0001, 0.00085, -0.1]),
    "beta_end": st.sampled_from([0.02, 0.012, 1.5]),
    "solver_order": st.integers(0, 5),
    "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction", "flow_prediction", "x0"]),
    "thresholding": st.booleans(),
    "dynamic_thresholding_ratio": st.sampled_from([0.995, 0.9, 1.5]),
    "sample_max_value": st.sampled_from([1.0, 2.5, -1.0]),
    "lower_order_final": st.booleans(),
    "sigmas": st.sampled_from([None, "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                               "use_flow_sigmas", ("use_karras_sigmas", "use_flow_sigmas")]),
    "flow_shift": st.sampled_from([1.0, 3.0, 0.0]),
    "timestep_spacing": st.sampled_from(["linspace", "leading", "trailing", "uniform"]),
    "steps_offset": st.sampled_from([0, 1]),
})


def _split(draw):
    kwargs = dict(draw)
    sigmas = kwargs.pop("sigmas")
    for name in (sigmas,) if isinstance(sigmas, str) else (sigmas or ()):
        kwargs[name] = True
    return kwargs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(draw=CONFIGS, n=st.integers(1, 12))
def test_random_configs_agree_with_diffusers_on_acceptance(draw, n):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    kwargs = _split(draw)
    shape = (2, 3, 4, 4)
    try:
        state = dj.set_timesteps(dj.DEISConfig(**kwargs), n, shape)
        ours_error = None
    except ValueError as e:
        ours_error = str(e)
    x0 = initial_noise(shape)
    try:
        with np.errstate(all="ignore"):
            timesteps, _, ref32 = diffusers_trajectory(kwargs, n, x0)
        ok = np.isfinite(ref32).all() and len(timesteps) == n
    except Exception:  # noqa: BLE001 - anything diffusers raises counts as a rejection
        ok = False
    if ours_error is None:
        _, ours = deis_trajectory(state.config, n, x0)
        assert np.isfinite(ours).all()
        if ok:
            _, _, ref64 = diffusers_trajectory(kwargs, n, x0, double=True)
            assert_float32_parity(ours, ref32, ref64)
    elif ok:
        assert any(f"{field}" in ours_error for field in DOCUMENTED_STRICTER), ours_error
