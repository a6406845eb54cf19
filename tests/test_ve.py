"""Variance-exploding (EDM) models, time_schedule="ve": x = x0 + sigma eps, the model given sigma or c_noise.

References are independent of deis_jax: the EDM paper's Karras grid (Karras et al. 2022, eq. 5), the exact
denoiser and probability-flow solution for Gaussian data, and the VP form of the same ODE (x_VP = x_VE alpha,
alpha = 1 / sqrt(1 + sigma^2), rho = sigma) solved by the VP code path on the same grid.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from helpers import GAUSS_MEAN, GAUSS_STD, gaussian_flow
from test_variants import DESIGNED, gaussian_error

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM's defaults
SOLVERS = sorted({v for v, _ in DESIGNED})
TOP_ORDER = {v: max(k for w, k in DESIGNED if w == v) for v in SOLVERS}


def edm_sigmas(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0):
    """EDM eq. 5: n noise levels (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.arange(n) / max(n - 1, 1)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_of(config, t):
    """The noise level a VE model reads from its time input: t itself, or exp(4 t) for EDM's c_noise = ln(sigma)/4."""
    return jnp.exp(4.0 * t) if config.ve_time_input == "c_noise" else t


def gaussian_denoiser(y, sigma):
    """E[x0 | x0 + sigma eps = y] for x0 ~ N(m, s^2): m + s^2 (y - m) / (s^2 + sigma^2)."""
    return GAUSS_MEAN + GAUSS_STD**2 * (y - GAUSS_MEAN) / (GAUSS_STD**2 + sigma**2)


def nonlinear_denoiser(y, sigma):
    """A smooth, nonlinear stand-in for a network (the Gaussian denoiser plus a bump)."""
    return gaussian_denoiser(y, sigma) + 0.05 * jnp.sin(y) / (1.0 + sigma)


def ve_model(config, denoiser=gaussian_denoiser):
    """The config's prediction type from a denoiser D(y, sigma): D itself ('sample') or eps = (y - D) / sigma."""
    def model_fn(x, t):
        sigma = sigma_of(config, t)
        d = denoiser(x, sigma)
        return d if config.prediction_type == "sample" else (x - d) / sigma
    return model_fn


def ve_config(**kw):
    return dj.DEISConfig(time_schedule="ve", **kw)


# ----------------------------------------------------------------------------- convergence


@pytest.mark.parametrize("time_input,prediction_type", [("sigma", "epsilon"), ("c_noise", "sample")])
@pytest.mark.parametrize("algorithm_type", ["deis", "data_prediction"])
@pytest.mark.parametrize("variant,order", sorted(DESIGNED))
def test_empirical_convergence_order(variant, order, algorithm_type, time_input, prediction_type):
    """Gaussian data, exact eps / denoiser, float64, steps uniform in log sigma on [0.002, 80] (as the VP test);
    slope of log error vs log N reaches the designed order - 0.3 (iPNDM: 2)."""
    config = ve_config(solver_type=variant, solver_order=order, algorithm_type=algorithm_type,
                       ve_time_input=time_input, prediction_type=prediction_type, use_exponential_sigmas=True,
                       lower_order_final=False)
    steps = (80, 160)
    errors = [gaussian_error(config, n, ve_model(config)) for n in steps]
    measured = -np.log(errors[1] / errors[0]) / np.log(steps[1] / steps[0])
    assert measured >= DESIGNED[variant, order] - 0.3, (errors, measured)


@pytest.mark.parametrize("variant", SOLVERS)
def test_default_karras_grid_converges(variant):
    """The default grid, lower_order_final on: 4x the steps cut the error at least 10x."""
    config = ve_config(solver_type=variant, solver_order=TOP_ORDER[variant])
    errors = [gaussian_error(config, n, ve_model(config)) for n in (10, 40)]
    assert errors[1] < 0.1 * errors[0] and errors[1] < 5e-3, errors


# ----------------------------------------------------------------------------- grid and model time


@pytest.mark.parametrize("time_input", ["sigma", "c_noise"])
@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_default_grid_is_karras_and_the_model_gets_sigma_or_c_noise(time_input, n):
    """N steps: N + 1 Karras levels from sigma_max to sigma_min (EDM eq. 5); state.sigmas holds sigma, and the
    model's time is sigma (k-diffusion) or ln(sigma) / 4 (EDM's c_noise), float32."""
    config = ve_config(ve_time_input=time_input, sigma_min=0.01, sigma_max=50.0)
    assert config.uses_karras_sigmas and not config.use_karras_sigmas  # the VE default, not a stored flag
    state = dj.set_timesteps(config, n, (3,))
    want = edm_sigmas(n + 1, 0.01, 50.0)
    np.testing.assert_allclose(np.asarray(state.sigmas), want, rtol=1e-6)
    t = np.asarray(state.timesteps)
    assert t.dtype == np.float32
    np.testing.assert_allclose(t, want[:-1] if time_input == "sigma" else np.log(want[:-1]) / 4, rtol=1e-6)
    assert float(state.init_noise_sigma) == pytest.approx(50.0)


@pytest.mark.parametrize("solver_type", SOLVERS)
@pytest.mark.parametrize("n", [1, 2, 10])
def test_final_zero_grid_is_edms(solver_type, n):
    """final_sigmas_type='zero': EDM's grid, N Karras levels from sigma_max to sigma_min, then 0."""
    config = ve_config(solver_type=solver_type, solver_order=TOP_ORDER[solver_type], final_sigmas_type="zero")
    state = dj.set_timesteps(config, n, (3,))
    evals, sigmas = config.evaluations_per_step, np.asarray(state.sigmas)
    step_sigmas = np.append(sigmas[: (n - 1) * evals + 1: evals], sigmas[-1])  # rhork: each step's first stage
    np.testing.assert_allclose(step_sigmas, np.append(edm_sigmas(n), 0.0), rtol=1e-6)
    assert state.num_inference_steps == (n - 1) * evals + 1


@pytest.mark.parametrize("algorithm_type", ["deis", "data_prediction"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("solver_type", SOLVERS)
def test_final_zero_ends_on_the_denoised_estimate(solver_type, prediction_type, algorithm_type):
    """The last step returns D(x, sigma) of the sample it is given, at sigma_min (float64)."""
    config = ve_config(solver_type=solver_type, solver_order=TOP_ORDER[solver_type], prediction_type=prediction_type,
                       algorithm_type=algorithm_type, final_sigmas_type="zero")
    model = ve_model(config, nonlinear_denoiser)
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.RandomState(1).randn(5)) * SIGMA_MAX
        state = dj.set_timesteps(config, 6, x.shape, dtype=jnp.float64)
        for t in state.timesteps:
            before, last_t = x, t
            x, state = dj.step(state, model(x, t), t, x)
        assert float(sigma_of(config, last_t)) == pytest.approx(SIGMA_MIN, rel=1e-12)
        np.testing.assert_allclose(np.asarray(x), np.asarray(nonlinear_denoiser(before, SIGMA_MIN)),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("algorithm_type", ["deis", "data_prediction"])
@pytest.mark.parametrize("solver_type", SOLVERS)
def test_one_step_to_zero_is_the_denoiser(solver_type, algorithm_type):
    """EDM's 1-step grid [sigma_max, 0]: the sample is D(sigma_max noise, sigma_max)."""
    config = ve_config(solver_type=solver_type, algorithm_type=algorithm_type, final_sigmas_type="zero",
                       prediction_type="sample")
    noise = jnp.asarray(np.random.RandomState(9).randn(6), jnp.float32)
    out = dj.sample_from_noise(ve_model(config, nonlinear_denoiser), noise, config=config, num_inference_steps=1)
    np.testing.assert_allclose(out, nonlinear_denoiser(SIGMA_MAX * noise, SIGMA_MAX), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the VP form of the same ODE


def vp_linear_rho(t, b0=0.1, b1=20.0):
    """rho(t) of the VP-linear schedule: log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2, rho = sqrt(alpha^-2 - 1)."""
    return jnp.sqrt(jnp.expm1(0.5 * t**2 * (b1 - b0) + t * b0))


def vp_model(prediction_type, denoiser):
    """The same model in VP form: x_VP = x_VE alpha, so D_VP(x, t) = D(x sqrt(1 + rho^2), rho), eps unchanged."""
    def model_fn(x, t):
        rho = vp_linear_rho(t)
        y = x * jnp.sqrt(1.0 + rho**2)
        d = denoiser(y, rho)
        return d if prediction_type == "sample" else (y - d) / rho
    return model_fn


# tab's basis is in the model time: VE's c_noise = ln(sigma)/4 is affine in log rho, so it is logrho's basis (in
# both forms: log(1/rho) = -log rho); VE's sigma is rho, rhoab's basis in the noise form (in the data form rhoab's
# is 1/rho). The other solvers do not look at the model time.
VP_TWIN = {("tab", "c_noise"): "logrho", ("tab", "sigma"): "rhoab"}


@pytest.mark.parametrize("end", ["sigma_min", "zero"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("solver_type,time_input,algorithm_type", [
    (s, "sigma", a) for s in SOLVERS for a in ("deis", "data_prediction") if (s, a) != ("tab", "data_prediction")
] + [("tab", "c_noise", "deis"), ("tab", "c_noise", "data_prediction")])
def test_equals_the_vp_formulation(solver_type, time_input, algorithm_type, prediction_type, end):
    """rho = sigma: a VE run equals the VP run (continuous vp_linear, same sigma grid via sigmas=) rescaled,
    x_VE = x_VP sqrt(1 + sigma^2), to 1e-10 in float64."""
    order = 3
    sigmas = np.append(edm_sigmas(12), 0.0) if end == "zero" else edm_sigmas(13)
    ve = ve_config(solver_type=solver_type, solver_order=order, ve_time_input=time_input,
                   prediction_type=prediction_type, algorithm_type=algorithm_type, final_sigmas_type=end)
    vp = dj.DEISConfig(time_schedule="vp_linear", t_min=1e-5, solver_type=VP_TWIN.get((solver_type, time_input),
                       solver_type), solver_order=order, prediction_type=prediction_type,
                       algorithm_type=algorithm_type, final_sigmas_type=end)
    with jax.enable_x64(True):
        noise = jnp.asarray(np.random.RandomState(2).randn(16))
        x_ve = dj.sample_from_noise(ve_model(ve, nonlinear_denoiser), noise, config=ve, sigmas=sigmas)
        x_vp = dj.sample_from_noise(vp_model(prediction_type, nonlinear_denoiser),
                                    noise * sigmas[0] / np.sqrt(1 + sigmas[0] ** 2), config=vp, sigmas=sigmas)
    np.testing.assert_allclose(np.asarray(x_ve), np.asarray(x_vp) * np.sqrt(1 + sigmas[-1] ** 2),
                               rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- custom grids, img2img


@pytest.mark.parametrize("time_input", ["sigma", "c_noise"])
@pytest.mark.parametrize("solver_type", ["logrho", "rhoab", "tab"])
def test_custom_sigmas(solver_type, time_input):
    """A custom grid: the model is evaluated at exactly its levels; the result approaches the exact flow."""
    config = ve_config(solver_type=solver_type, solver_order=3, ve_time_input=time_input)
    sigmas = np.geomspace(60.0, 0.01, 25)
    seen = []

    def model(x, t):
        seen.append(t)
        return ve_model(config)(x, t)

    with jax.enable_x64(True):
        noise = jnp.asarray(np.random.RandomState(3).randn(8))
        state, x = dj.set_timesteps(config, None, noise.shape, dtype=jnp.float64, sigmas=sigmas), noise * 60.0
        for t in state.timesteps:
            x, state = dj.step(state, model(x, t), t, x)
        ref = dj.sample_from_noise(ve_model(config), noise, config=config, sigmas=sigmas)
    np.testing.assert_allclose(np.asarray(state.sigmas), sigmas, rtol=1e-12)
    t = np.asarray(seen)
    np.testing.assert_allclose(np.exp(4 * t) if time_input == "c_noise" else t, sigmas[:-1], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(x), rtol=1e-12)  # x_T = sigma_0 noise
    exact = gaussian_flow(np.asarray(noise) * 60.0, 1.0, 60.0, 1.0, 0.01)
    assert np.abs(np.asarray(x) - exact).max() < 0.02


def test_custom_sigmas_outside_the_range_are_rejected():
    config = ve_config()
    with pytest.raises(ValueError, match=re.escape("every entry must lie in the schedule's range [0.002, 80]")):
        dj.set_timesteps(config, None, (2,), sigmas=[100.0, 10.0, 1.0])
    with pytest.raises(ValueError, match=re.escape("timesteps= is invalid for a continuous")):
        dj.set_timesteps(config, None, (2,), timesteps=[900, 500])


@pytest.mark.parametrize("time_input", ["sigma", "c_noise"])
def test_add_noise_is_x0_plus_sigma_noise(time_input):
    config = ve_config(ve_time_input=time_input)
    state = dj.set_timesteps(config, 10, (2, 3))
    x0 = jnp.asarray(np.random.RandomState(4).randn(2, 3), jnp.float32)
    noise = jnp.asarray(np.random.RandomState(5).randn(2, 3), jnp.float32)
    sigmas = np.array([5.0, 0.3])
    t = jnp.asarray(sigmas if time_input == "sigma" else np.log(sigmas) / 4, jnp.float32)
    out = dj.add_noise(state, x0, noise, t)
    np.testing.assert_allclose(out, np.asarray(x0) + sigmas[:, None] * np.asarray(noise), rtol=1e-5)
    one = dj.add_noise(state, x0, noise, t[0])
    np.testing.assert_allclose(one, np.asarray(x0) + 5.0 * np.asarray(noise), rtol=1e-5)


@pytest.mark.parametrize("solver_type", ["logrho", "rhork"])
def test_img2img_starts_at_x0_plus_sigma_noise(solver_type):
    """strength 0.5 of 20 steps: the first model input is image + sigma_10 noise (sigma_10 from EDM's grid)."""
    config = ve_config(solver_type=solver_type, prediction_type="sample")
    image = jnp.linspace(-1.0, 1.0, 6)
    noise = jnp.asarray(np.random.RandomState(6).randn(6), jnp.float32)
    seen = []

    def model(x, t):
        jax.debug.callback(lambda x, t: seen.append((np.asarray(x), float(t))), x, t, ordered=True)
        return gaussian_denoiser(x, t)

    out = dj.img2img(model, image, noise, strength=0.5, config=config, num_inference_steps=20)
    jax.effects_barrier()
    sigma = edm_sigmas(21)[10]
    assert seen[0][1] == pytest.approx(sigma, rel=1e-6)
    np.testing.assert_allclose(seen[0][0], image + sigma * noise, rtol=1e-5, atol=1e-6)
    exact = gaussian_flow(np.asarray(image + sigma * noise), 1.0, sigma, 1.0, SIGMA_MIN)
    np.testing.assert_allclose(out, exact, atol=0.05)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,message", [
    (dict(time_schedule="ve", t_max=0.5), "DEISConfig.t_max=0.5 is invalid"),
    (dict(time_schedule="ve", t_min=0.01), "DEISConfig.t_min=0.01 is invalid: is only used with a VP"),
    (dict(time_schedule="ve", continuous_beta_max=10.0), "DEISConfig.continuous_beta_max=10.0 is invalid: is only"),
    (dict(time_schedule="ve", use_flow_sigmas=True, prediction_type="flow_prediction"),
     "DEISConfig.time_schedule='ve' is invalid: cannot be combined with use_flow_sigmas or trained_betas"),
    (dict(time_schedule="ve", trained_betas=[0.01] * 1000),
     "DEISConfig.time_schedule='ve' is invalid: cannot be combined with use_flow_sigmas or trained_betas"),
    (dict(time_schedule="ve", prediction_type="v_prediction"), "DEISConfig.prediction_type='v_prediction' is inv"),
    (dict(time_schedule="ve", prediction_type="flow_prediction"), "DEISConfig.prediction_type='flow_prediction'"),
    (dict(time_schedule="ve", timestep_spacing="trailing"), "DEISConfig.timestep_spacing='trailing' is invalid"),
    (dict(time_schedule="ve", timestep_spacing="quadratic"), "DEISConfig.timestep_spacing='quadratic' is inv"),
    (dict(time_schedule="ve", sigma_min=0.0), "DEISConfig.sigma_min=0.0 is invalid: must be a finite number in (0"),
    (dict(time_schedule="ve", sigma_min=-1.0), "DEISConfig.sigma_min=-1.0 is invalid"),
    (dict(time_schedule="ve", sigma_max=0.001), "DEISConfig.sigma_max=0.001 is invalid: must be a finite number in"),
    (dict(time_schedule="ve", sigma_max=float("inf")), "DEISConfig.sigma_max=inf is invalid"),
    (dict(time_schedule="ve", sigma_max="80"), "DEISConfig.sigma_max='80' is invalid"),
    (dict(time_schedule="ve", ve_time_input="t"), "DEISConfig.ve_time_input='t' is invalid: must be one of"),
    (dict(time_schedule="ve", use_exponential_sigmas=True, use_karras_sigmas=True),
     "DEISConfig.use_karras_sigmas, use_exponential_sigmas=True is invalid: at most one"),
    (dict(ve_time_input="c_noise"), "DEISConfig.ve_time_input='c_noise' is invalid: is only used with time_sched"),
    (dict(time_schedule="vp_linear", sigma_min=0.01), "DEISConfig.sigma_min=0.01 is invalid: is only used with"),
    (dict(sigma_max=100.0), "DEISConfig.sigma_max=100.0 is invalid: is only used with time_schedule='ve'"),
])
def test_rejected_configs(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dj.DEISConfig(**kwargs)


def test_other_grids_and_published_grids():
    """Exponential and beta grids are available; published (VP) grids are not."""
    state = dj.set_timesteps(ve_config(use_exponential_sigmas=True), 4, (1,))
    np.testing.assert_allclose(np.asarray(state.sigmas), np.geomspace(SIGMA_MAX, SIGMA_MIN, 5), rtol=1e-6)
    beta = np.asarray(dj.set_timesteps(ve_config(use_beta_sigmas=True), 4, (1,)).sigmas)
    assert beta[0] == pytest.approx(SIGMA_MAX) and beta[-1] == pytest.approx(SIGMA_MIN) and (np.diff(beta) < 0).all()
    with pytest.raises(ValueError, match="time_schedule='ve'"):
        dj.published_sigmas("ays_sd15", ve_config())


# ----------------------------------------------------------------------------- precision, dtypes, transforms


@pytest.mark.parametrize("config", [ve_config(), ve_config(solver_type="tab", solver_order=3, ve_time_input="c_noise",
                                                           prediction_type="sample", final_sigmas_type="zero")],
                         ids=["default", "tab-cnoise-zero"])
def test_float32_close_to_float64(config):
    noise = np.random.RandomState(7).randn(64)
    model = ve_model(config, nonlinear_denoiser)
    x32 = dj.sample_from_noise(model, jnp.asarray(noise, jnp.float32), config=config, num_inference_steps=20)
    with jax.enable_x64(True):
        x64 = dj.sample_from_noise(model, jnp.asarray(noise), config=config, num_inference_steps=20)
    assert x32.dtype == jnp.float32
    assert np.abs(np.asarray(x32) - np.asarray(x64)).max() < 1e-5 * np.abs(np.asarray(x64)).max()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_noise_keeps_its_dtype(dtype):
    """x_T = sigma_max noise is formed in the noise's dtype: the model sees it and the result comes back in it."""
    config = ve_config(prediction_type="sample")
    seen = []

    def model(x, t):
        seen.append(x.dtype)
        return gaussian_denoiser(x, t).astype(x.dtype)

    noise = jax.random.normal(jax.random.key(0), (8,))
    out = dj.sample_from_noise(model, noise.astype(dtype), config=config, num_inference_steps=10)
    ref = dj.sample_from_noise(model, noise, config=config, num_inference_steps=10)
    assert out.dtype == dtype and set(seen) == {jnp.dtype(dtype), jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)


def test_jit_vmap_and_no_retrace():
    config = ve_config(solver_order=3)
    model = ve_model(config)
    fn = lambda key: dj.sample(model, key, (4,), config=config, num_inference_steps=12)  # noqa: E731
    traced = jax.jit(chex.assert_max_traces(fn, n=1))
    keys = jax.random.split(jax.random.key(8), 3)
    batched = jax.jit(jax.vmap(fn))(keys)
    for i, key in enumerate(keys):
        np.testing.assert_allclose(traced(key), batched[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(traced(key), fn(key), rtol=1e-5, atol=1e-5)
    noise = jax.random.normal(keys[0], (4,))
    exact = gaussian_flow(np.asarray(noise) * SIGMA_MAX, 1.0, SIGMA_MAX, 1.0, SIGMA_MIN)
    np.testing.assert_allclose(traced(keys[0]), exact, atol=0.01)  # x_T = sigma_max noise
