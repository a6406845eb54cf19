"""Issue 11, stochastic DEIS (`eta`): the reverse SDE dx = [f x - (1 + eta^2) g^2 score / 2] dt + eta g dW.

References: diffusers' DPMSolverMultistepScheduler (sde-dpmsolver / sde-dpmsolver++) run live at order 1;
scipy quadrature of the integrals the weights are derived from; exact samples of a Gaussian mixture
(two-sample MMD with a permutation null); the exact output law of a linear scheme on Gaussian data."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy import integrate

import deis_jax as dj
from deis_jax import coefficients, schedule, spacing
from helpers import (
    GAUSS_MEAN,
    GAUSS_STD,
    assert_float32_parity,
    benchmark_module,
    dpmsolver_trajectory,
    gaussian_eps_model,
    initial_noise,
    relative_error,
    toy_model,
)
from test_variants import exact_gaussian_model

SHAPE = (2, 3, 4)
SDE_ALGORITHMS = {"deis": "sde-dpmsolver", "data_prediction": "sde-dpmsolver++"}
GRIDS = {"linspace": {}, "karras": {"use_karras_sigmas": True}, "trailing": {"timestep_spacing": "trailing"}}


def _noises(n: int, shape=SHAPE, seed=1) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, *shape)


def _trajectory(state: dj.DEISState, x: np.ndarray, noises: np.ndarray) -> np.ndarray:
    """Every sample of a jitted scan over `step` with the toy model and the given per-step noise: [E, *shape]."""
    def body(carry, tz):
        x, state = carry
        t, z = tz
        x, state = dj.step(state, toy_model(x, t), t, x, variance_noise=z)
        return (x, state), x

    def run(s, x, z):
        return jax.lax.scan(body, (x, s), (s.timesteps, z.astype(x.dtype)))[1]

    return np.asarray(jax.jit(run)(state, jnp.asarray(x), jnp.asarray(noises)))


@pytest.mark.parametrize("form,final", [("deis", "sigma_min"), ("data_prediction", "sigma_min"),
                                        ("data_prediction", "zero")])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_order_one_eta_one_equals_sde_dpmsolver(prediction_type, grid, form, final):
    """At order 1 and eta = 1 each form is the exact first-order scheme of the reverse SDE, as DPM-Solver's SDE
    variants are: the noise form is `sde-dpmsolver`, the data form `sde-dpmsolver++`, given the same noise
    (diffusers supports final_sigmas_type='zero' only with the ++ variant)."""
    pytest.importorskip("diffusers")
    kwargs = dict(solver_order=1, prediction_type=prediction_type, final_sigmas_type=final, **GRIDS[grid])
    x0 = initial_noise(SHAPE)
    # One Karras step to sigma_min: diffusers' DEIS (our parity target) repeats sigma_max, DPM-Solver does not.
    for n in (10,) if grid == "karras" and final == "sigma_min" else (1, 10):
        noises = _noises(n)
        config = dj.DEISConfig(**kwargs, algorithm_type=form)
        with jax.enable_x64(True):
            state = dj.set_timesteps(config, n, SHAPE, dtype=jnp.float64, eta=1.0)
            ours = _trajectory(state, x0.astype(np.float64), noises)
        table = np.asarray(state.sigmas)
        ref_kwargs = dict(kwargs, algorithm_type=SDE_ALGORITHMS[form])
        ref_t, ref_sigmas, ref64 = dpmsolver_trajectory(ref_kwargs, n, x0, sigma_table=table, noises=noises)
        np.testing.assert_array_equal(state.timesteps, ref_t)
        np.testing.assert_allclose(table, ref_sigmas, rtol=2.5e-7)
        assert relative_error(ours, ref64) <= 1e-12, relative_error(ours, ref64)
        _, _, ref32 = dpmsolver_trajectory(ref_kwargs, n, x0, noises=noises)
        ours32 = _trajectory(dj.set_timesteps(config, n, SHAPE, eta=1.0), x0, noises)
        assert_float32_parity(ours32, ref32, ref64)


def _lagrange(nodes: np.ndarray, j: int):
    """ell_j through `nodes` (numpy.polynomial), independent of coefficients._basis_per_step."""
    others = np.delete(nodes, j)
    if len(others) == 0:
        return np.polynomial.Polynomial([1.0])
    return np.polynomial.Polynomial.fromroots(others) / np.prod(nodes[j] - others)


@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("form", ["deis", "data_prediction"])
def test_weights_equal_the_integrals_by_quadrature(form, order, eta):
    """Each step's a, lag weights and noise std against scipy quadrature of the integrals they come from.

    y = x / alpha obeys dy = (1 + eta^2) eps d rho + eta sqrt(-d rho^2) dW. Noise form (eps extrapolated by
    ell_j in log rho): c_j = (1 + eta^2) alpha' int ell_j d rho, var = alpha'^2 eta^2 int_{rho'}^{rho} 2 r dr.
    Data form, eps = (y - x0) / rho, integrating factor rho^-(1+eta^2): a = (alpha' / alpha) (rho' / rho)^(1+eta^2),
    c_j = (1 + eta^2) alpha' rho'^(1+eta^2) int_{rho'}^{rho} ell_j(-log r) r^-(2+eta^2) dr,
    var = alpha'^2 rho'^(2+2eta^2) eta^2 int_{rho'}^{rho} r^-(2+2eta^2) 2 r dr.
    """
    config = dj.DEISConfig(solver_order=order, algorithm_type=form, use_karras_sigmas=True)
    grid = spacing.grid(config, 8)
    t = coefficients.build(config, grid, 0, eta=eta)
    rho = grid.sigmas
    alpha, sigma = (np.asarray(v) for v in schedule.alpha_sigma(config, rho, xp=np))
    e2, rate = eta**2, 1 + eta**2
    data = form == "data_prediction"
    for i in range(len(rho) - 1):
        r0, r1 = rho[i], rho[i + 1]
        k = int(t["orders"][i])
        nodes = (-np.log(rho) if data else np.log(rho))[i - np.arange(k)]
        for j in range(k):
            ell = _lagrange(nodes, j)
            if data:
                val, _ = integrate.quad(lambda r, ell=ell: ell(-np.log(r)) * r ** -(2 + e2), r1, r0,
                                        epsabs=0, epsrel=1e-13)
                expected = rate * alpha[i + 1] * r1**rate * val
            else:
                val, _ = integrate.quad(lambda r, ell=ell: ell(np.log(r)), r0, r1, epsabs=0, epsrel=1e-13)
                expected = rate * alpha[i + 1] * val
            np.testing.assert_allclose(t["c"][i, j], expected, rtol=1e-9, err_msg=f"step {i} lag {j}")
        if data:
            var, _ = integrate.quad(lambda r: r ** -(2 * rate) * 2 * r, r1, r0, epsabs=0, epsrel=1e-13)
            var *= (alpha[i + 1] * r1**rate * eta) ** 2
            np.testing.assert_allclose(t["a"][i], alpha[i + 1] / alpha[i] * (r1 / r0) ** rate, rtol=1e-12)
        else:
            var = (alpha[i + 1] * eta) ** 2 * integrate.quad(lambda r: 2 * r, r1, r0)[0]
            np.testing.assert_allclose(t["a"][i], alpha[i + 1] / alpha[i], rtol=1e-12)
        np.testing.assert_allclose(t["noise"][i] ** 2, var, rtol=1e-9, err_msg=f"noise of step {i}")


# ----------------------------------------------------------------------------- the output distribution

def _gaussian_law(config: dj.DEISConfig, n: int, eta: float):
    """(mean, std) of the output of the sampler on 1-d Gaussian data with the exact (linear) eps model: the
    output is affine in (x_T, z_0..z_{N-1}) ~ N(0, I), so mean = f(0) and var = |grad f|^2, exactly."""
    model = exact_gaussian_model(config)
    with jax.enable_x64(True):
        state = dj.set_timesteps(config, n, (), dtype=jnp.float64, eta=eta)

        def f(xz):
            x, s = xz[0], state
            for i in range(n):
                t = s.timesteps[i]
                x, s = dj.step(s, model(x, t), t, x, variance_noise=xz[i + 1])
            return x

        zeros = jnp.zeros(n + 1, jnp.float64)
        return float(f(zeros)), float(jnp.linalg.norm(jax.grad(f)(zeros))), float(state.sigmas[-1])


def _w2_to_marginal(config: dj.DEISConfig, n: int, eta: float) -> float:
    """Wasserstein-2 distance of the exact output law to the true marginal N(alpha m, alpha^2 s^2 + sigma^2) at
    the grid's last level (data N(m, s^2) = N(0.5, 0.3^2))."""
    mean, std, rho = _gaussian_law(config, n, eta)
    alpha, sigma = schedule.alpha_sigma(config, np.float64(rho), xp=np)
    return float(np.hypot(mean - alpha * GAUSS_MEAN, std - np.sqrt((alpha * GAUSS_STD) ** 2 + sigma**2)))


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_output_law_converges_and_improves_with_order(eta):
    """On Gaussian data the output law is computable exactly (continuous VP schedule, uniform steps in log rho, data
    form): its W2 distance to the true marginal falls with N at every order, and at NFE 20 and 40 falls with the
    order (1 > 2 > 3). (The noise form's orders 2-3 are unstable with eta > 0 below ~40 steps: README.)"""
    w2 = {(k, n): _w2_to_marginal(dj.DEISConfig(solver_order=k, algorithm_type="data_prediction",
                                                time_schedule="vp_linear", use_exponential_sigmas=True,
                                                lower_order_final=False), n, eta)
          for k in (1, 2, 3) for n in (20, 40, 80)}
    for k in (1, 2, 3):
        assert w2[k, 20] > w2[k, 40] > w2[k, 80], {n: w2[k, n] for n in (20, 40, 80)}
    for n in (20, 40):
        assert w2[1, n] > w2[2, n] > w2[3, n], {k: w2[k, n] for k in (1, 2, 3)}


def test_sde_lowers_the_order_of_the_last_steps_at_any_step_count():
    """diffusers' lower_order_final acts below 15 steps; for the SDE it acts at any N: extrapolating the noisy x0 of
    an SDE path with order 3 across the wide last linspace step (rho 0.18 -> 0.01 at N = 20) diverges (exact
    Gaussian law: W2 > 1), with orders ..., 2, 1 at the end it converges. The ODE keeps diffusers' rule."""
    config = dj.DEISConfig(solver_order=3, algorithm_type="data_prediction")
    assert np.asarray(dj.set_timesteps(config, 20, (1,), eta=1.0).orders)[-3:].tolist() == [3, 2, 1]
    assert np.asarray(dj.set_timesteps(config, 20, (1,)).orders)[-3:].tolist() == [3, 3, 3]
    assert _w2_to_marginal(config, 20, 1.0) < 0.05
    assert _w2_to_marginal(dataclasses.replace(config, lower_order_final=False), 20, 1.0) > 1.0


def _mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD^2 with the Gaussian kernel exp(-|a - b|^2 / (2 bandwidth^2))."""
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * bandwidth**2))
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def _mmd_p_value(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0) -> float:
    """Permutation test of x ~ y with MMD^2, median-heuristic bandwidth."""
    both = np.concatenate([x, y])
    d = np.sqrt(((both[:, None] - both[None]) ** 2).sum(-1))
    bandwidth = float(np.median(d[np.triu_indices(len(both), 1)]))
    observed = _mmd2(x, y, bandwidth)
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(permutations):
        p = rng.permutation(len(both))
        null.append(_mmd2(both[p[: len(x)]], both[p[len(x):]], bandwidth))
    return (1 + np.sum(np.array(null) >= observed)) / (1 + permutations)


MIX_N = 600


@pytest.fixture(scope="module")
def mixture():
    acc = benchmark_module("accuracy")
    mix = acc.make_mixture(components=4, dim=2, seed=3)
    rng = np.random.default_rng(7)
    comp = rng.choice(len(mix.stds), size=MIX_N, p=np.exp(mix.log_pi))
    exact = mix.means[comp] + mix.stds[comp, None] * rng.standard_normal((MIX_N, 2))
    return acc, mix, exact


def _mixture_samples(acc, mix, config: dj.DEISConfig, n: int, eta: float, state_edit=None) -> np.ndarray:
    with jax.enable_x64(True):
        model = acc.model_jax(mix, config)
        key = jax.random.key(11)
        state = dj.set_timesteps(config, n, (MIX_N, 2), dtype=jnp.float64, eta=eta)
        if state_edit is not None:
            state = state_edit(state)
        x = jax.random.normal(key, (MIX_N, 2), jnp.float64)
        return np.asarray(jax.jit(lambda x, s, k: dj.run_loop(model, x, s, key=k))(x, state, jax.random.key(12)))


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("form", ["deis", "data_prediction"])
def test_mixture_samples_match_the_data(mixture, form, eta):
    """Many SDE steps with the exact eps model of a Gaussian mixture: the samples are a draw from the mixture
    (MMD permutation test, p > 0.01; means and variances per dimension within 4 standard errors)."""
    acc, mix, exact = mixture
    config = dj.DEISConfig(solver_order=2, algorithm_type=form, final_sigmas_type="zero")
    ours = _mixture_samples(acc, mix, config, 200, eta)
    assert _mmd_p_value(ours, exact) > 0.01
    se_mean = exact.std(0) * np.sqrt(2 / MIX_N)
    assert np.all(np.abs(ours.mean(0) - exact.mean(0)) < 4 * se_mean), (ours.mean(0), exact.mean(0))
    kurt_se = exact.var(0) * np.sqrt(2 * 2 / MIX_N) * 2  # generous: the mixture is heavy-tailed
    assert np.all(np.abs(ours.var(0) - exact.var(0)) < 4 * kurt_se), (ours.var(0), exact.var(0))


def test_the_mixture_test_rejects_a_wrong_sde_sampler(mixture):
    """The same test catches a sampler that injects the SDE's noise but keeps the ODE's drift."""
    acc, mix, exact = mixture
    config = dj.DEISConfig(solver_order=2, algorithm_type="data_prediction", final_sigmas_type="zero")
    with jax.enable_x64(True):
        ode = dj.set_timesteps(config, 200, (MIX_N, 2), dtype=jnp.float64)
    wrong = _mixture_samples(acc, mix, config, 200, 1.0,
                             state_edit=lambda s: dataclasses.replace(s, a=ode.a, weights=ode.weights))
    assert _mmd_p_value(wrong, exact) <= 0.01


# ----------------------------------------------------------------------------- the API

def test_eta_zero_is_the_ode_loop_without_random_draws():
    config = dj.DEISConfig(solver_order=3)
    model = gaussian_eps_model(config)
    key = jax.random.key(0)
    ode = dj.sample(model, key, (4, 3), config=config, num_inference_steps=10)
    same = dj.sample(model, key, (4, 3), config=config, num_inference_steps=10, eta=0.0, )
    np.testing.assert_array_equal(ode, same)
    jaxpr = str(jax.make_jaxpr(lambda k: dj.sample(model, k, (4, 3), config=config, eta=0.0))(key))
    assert "random_fold_in" not in jaxpr and jaxpr.count("scan[") == 1
    jaxpr = str(jax.make_jaxpr(lambda k: dj.sample(model, k, (4, 3), config=config, eta=0.5))(key))
    assert jaxpr.count("random_fold_in") == 1 and jaxpr.count("scan[") == 1  # one draw, inside the one scan


def test_sample_draws_step_i_noise_from_fold_in():
    """The documented contract: step i's noise is N(0, I) from jax.random.fold_in(key, i), x_T from key."""
    config = dj.DEISConfig(solver_order=2, algorithm_type="data_prediction")
    model = gaussian_eps_model(config)
    key = jax.random.key(3)
    got = dj.sample(model, key, (5,), config=config, num_inference_steps=6, eta=0.7)
    state = dj.set_timesteps(config, 6, (5,), eta=0.7)
    x = jax.random.normal(key, (5,))
    for i in range(6):
        t = state.timesteps[i]
        x, state = dj.step(state, model(x, t), t, x, variance_noise=jax.random.normal(jax.random.fold_in(key, i), (5,)))
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6)


def test_jit_vmap_and_begin_index_keep_eta():
    config = dj.DEISConfig(solver_order=2)
    model = gaussian_eps_model(config)
    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.jit(jax.vmap(lambda k: dj.sample(model, k, (4,), config=config, num_inference_steps=8,
                                                   eta=1.0)))(keys)
    for i, k in enumerate(keys):
        np.testing.assert_allclose(batched[i], dj.sample(model, k, (4,), config=config, num_inference_steps=8,
                                                         eta=1.0), rtol=1e-6)
    assert not np.allclose(batched[0], batched[1])
    state = dj.set_begin_index(dj.set_timesteps(config, 8, (4,), eta=0.5), 4)
    assert state.eta == 0.5 and np.all(np.asarray(state.noise[4:-1]) > 0)
    image = jnp.full((4,), 0.3)
    a = dj.img2img(model, image, jnp.ones(4), strength=0.5, config=config, num_inference_steps=8, eta=0.5,
                   key=jax.random.key(1))
    b = dj.img2img(model, image, jnp.ones(4), strength=0.5, config=config, num_inference_steps=8, eta=0.5,
                   key=jax.random.key(2))
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)


def test_half_precision_sde():
    config = dj.DEISConfig(solver_order=2, algorithm_type="data_prediction", final_sigmas_type="zero")
    exact = gaussian_eps_model(config)

    def model(x, t):
        return exact(x, t).astype(x.dtype)

    key = jax.random.key(0)
    half = dj.sample(model, key, (64,), config=config, num_inference_steps=10, dtype=jnp.float16, eta=1.0)
    full = dj.sample(model, key, (64,), config=config, num_inference_steps=10, eta=1.0)
    assert half.dtype == jnp.float16
    assert np.max(np.abs(np.asarray(half, np.float32) - full)) < 0.05


def test_zero_terminal_snr_start_renoises():
    """From rho = inf (zero terminal SNR) any eta > 0 integrates an infinite log-SNR span: the first step is
    x' = alpha' x0 + sigma' z in both forms (x_T is forgotten but through x0)."""
    from test_reliability import _rescaled_zero_snr_betas

    for form in ("deis", "data_prediction"):
        config = dj.DEISConfig(trained_betas=tuple(_rescaled_zero_snr_betas()), prediction_type="v_prediction",
                               timestep_spacing="trailing", algorithm_type=form)
        with jax.enable_x64(True):
            state = dj.set_timesteps(config, 5, (3,), dtype=jnp.float64, eta=0.5)
        alpha1, sigma1 = schedule.alpha_sigma(config, np.asarray(state.sigmas[1]), xp=np)
        assert float(state.a[0]) == 0.0 and np.isclose(float(state.noise[0]), sigma1, rtol=1e-12)
        x0_weight = state.b[0] + (state.weights[0, 0] if form == "data_prediction" else 0.0)
        assert np.isclose(float(x0_weight), alpha1, rtol=1e-12)
        assert np.all(np.isfinite(np.asarray(state.noise))) and np.all(np.isfinite(np.asarray(state.weights)))


@pytest.mark.parametrize("eta,match", [(-0.1, r"eta=-0\.1 is invalid: must be a Python number in \[0, 1\]"),
                                       (1.5, r"eta=1\.5 is invalid"), (True, r"eta=True is invalid"),
                                       (jnp.float32(0.5), r"eta=.* is invalid: must be a Python number")])
def test_invalid_eta(eta, match):
    with pytest.raises(ValueError, match=match):
        dj.set_timesteps(dj.DEISConfig(), 10, (3,), eta=eta)


@pytest.mark.parametrize("kwargs,allowed", [
    (dict(solver_type="rhork"), r"\('logrho', 'rhoab', 'ipndm', 'tab'\)"),
    (dict(solver_type="tab", algorithm_type="data_prediction"), r"\('logrho',\)"),
    (dict(solver_type="ipndm", algorithm_type="data_prediction"), r"\('logrho',\)"),
])
def test_eta_needs_a_supported_solver(kwargs, allowed):
    config = dj.DEISConfig(**kwargs)
    with pytest.raises(ValueError, match=rf"eta=0\.5 is invalid with solver_type=.*needs solver_type in {allowed}"):
        dj.set_timesteps(config, 10, (3,), eta=0.5)
    dj.set_timesteps(config, 10, (3,), eta=0.0)  # the ODE is fine


def test_missing_noise_or_key_is_a_clear_error():
    config = dj.DEISConfig()
    model = gaussian_eps_model(config)
    state = dj.set_timesteps(config, 4, (3,), eta=1.0)
    x = jnp.ones(3)
    with pytest.raises(ValueError, match=r"variance_noise=None is invalid: a state made with eta=1\.0 needs"):
        dj.step(state, model(x, state.timesteps[0]), state.timesteps[0], x)
    with pytest.raises(ValueError, match=r"variance_noise=shape \(2,\) is invalid"):
        dj.step(state, model(x, state.timesteps[0]), state.timesteps[0], x, variance_noise=jnp.ones(2))
    with pytest.raises(ValueError, match=r"key=None is invalid with eta=1\.0"):
        dj.sample_from_noise(model, x, config=config, num_inference_steps=4, eta=1.0)
    with pytest.raises(ValueError, match=r"key=None is invalid with eta=1\.0"):
        dj.img2img(model, x, x, strength=0.5, config=config, num_inference_steps=4, eta=1.0)
    with pytest.raises(ValueError, match=r"key=None is invalid with eta=1\.0"):
        dj.run_loop(model, x, state)


# ----------------------------------------------------------------------------- options crossed with eta

@st.composite
def _sde_cases(draw) -> dict:
    """A valid config with eta > 0 where the options meet: schedule kind, prediction type, form, every solver type
    the form allows, order, final step, grid (spacing, sigma grid, a custom one), thresholding, begin index,
    dtype and call style."""
    form = draw(st.sampled_from(dj.ALGORITHM_TYPES))
    solver = draw(st.sampled_from(dj.solver.STOCHASTIC_SOLVER_TYPES[form]))
    kw = dict(algorithm_type=form, solver_type=solver, solver_order=draw(st.integers(1, 3)),
              final_sigmas_type=draw(st.sampled_from(dj.FINAL_SIGMAS_TYPES)),
              lower_order_final=draw(st.booleans()), thresholding=draw(st.booleans()))
    kind = draw(st.sampled_from(["discrete", "continuous", "flow"]))
    if kind == "flow":
        kw.update(use_flow_sigmas=True, flow_shift=draw(st.sampled_from([1.0, 3.0])), prediction_type="flow_prediction")
    else:
        kw["prediction_type"] = draw(st.sampled_from(["epsilon", "sample", "v_prediction"]))
        if kind == "continuous":
            kw["time_schedule"] = draw(st.sampled_from(["vp_linear", "vp_cosine"]))
        grid = draw(st.sampled_from(["linspace", "trailing", "use_karras_sigmas", "use_exponential_sigmas"]))
        kw.update({grid: True} if grid.startswith("use_") else {"timestep_spacing": grid})
    n = draw(st.integers(1, 12))
    return dict(config=dj.DEISConfig(**kw), n=n, eta=draw(st.sampled_from([0.25, 1.0])),
                custom=draw(st.booleans()), begin=draw(st.integers(0, n - 1)),
                dtype=draw(st.sampled_from(["float32", "float16"])), jit=draw(st.booleans()))


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(case=_sde_cases())
def test_sde_across_options(case):
    """Any valid mix of options with eta > 0: the samples are finite, the state keeps eta and a noise std that is
    0 exactly where a step ends at sigma = 0 or has zero length (diffusers' repeated last sigma), a jitted call
    equals the eager one, and a custom grid of the named grid's own levels gives the named grid's samples."""
    from test_properties import _model

    config, n, eta, dtype = case["config"], case["n"], case["eta"], case["dtype"]
    state = dj.set_timesteps(config, n, (2, 3), dtype=dtype, eta=eta)
    noise_std = np.asarray(state.noise, np.float64)
    assert state.eta == eta and np.isfinite(noise_std).all() and (noise_std >= 0).all()
    sig = np.asarray(state.sigmas, np.float64)
    np.testing.assert_array_equal(noise_std == 0, (sig[1:] == 0) | (sig[1:] == sig[:-1]))  # to 0, or zero length
    grid = {"sigmas": spacing.grid(config, n).step_sigmas} if case["custom"] and config.solver_type != "tab" else {}
    if grid and np.any(np.diff(grid["sigmas"]) >= 0):  # diffusers' zero-length last step: not a custom grid
        grid = {}
    begin = case["begin"] if not grid else 0
    noise = jnp.asarray(np.random.RandomState(0).randn(2, 3), dtype)
    key = jax.random.key(1)
    model = _model(config)

    def run(z, k, **g):
        return dj.sample_from_noise(model, z, config=config, num_inference_steps=None if g else n, begin_index=begin,
                                    eta=eta, key=k, **g)

    out = np.asarray(run(noise, key), np.float32)
    assert np.isfinite(out).all(), out
    if case["jit"]:
        np.testing.assert_allclose(np.asarray(jax.jit(run)(noise, key), np.float32), out,
                                   rtol=1e-2 if dtype == "float16" else 1e-5, atol=1e-2 if dtype == "float16" else 1e-5)
    if grid:
        np.testing.assert_allclose(np.asarray(run(noise, key, **grid), np.float32), out, rtol=1e-4, atol=1e-4)
