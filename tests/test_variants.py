"""The DEIS family beyond diffusers: convergence orders against the exact ODE, grids, NFE, invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import schedule
from helpers import GAUSS_MEAN, GAUSS_STD, gaussian_flow, toy_model

# Designed convergence order of each variant and solver_order. iPNDM's fixed Adams-Bashforth
# weights assume equal steps; on smoothly graded grids it converges at second order.
DESIGNED = {("logrho", k): k for k in (1, 2, 3)}
DESIGNED.update({(v, k): k for v in ("tab", "rhoab", "rhork") for k in (1, 2, 3, 4)})
DESIGNED.update({("ipndm", k): min(k, 2) for k in (1, 2, 3, 4)})


def exact_gaussian_model(config):
    """eps for data ~ N(0.5, 0.3^2) at the noise level the model's timestep stands for."""
    def model_fn(x, t):
        rho = schedule.rho_at(config, t, xp=jnp)
        alpha = 1.0 / jnp.sqrt(1.0 + rho**2)
        sigma = rho * alpha
        return sigma * (x - alpha * GAUSS_MEAN) / (alpha**2 * GAUSS_STD**2 + sigma**2)
    return model_fn


def gaussian_error(config, n, model_fn=None):
    """max |x - x_exact| / max |x_exact| after n steps (float64), x_exact from the closed-form flow, the model
    `exact_gaussian_model` unless given. VP: x_T = noise, alpha = 1 / sqrt(1 + rho^2); VE (x = x0 + sigma eps):
    x_T = sigma_0 noise, alpha = 1."""
    model_fn = exact_gaussian_model(config) if model_fn is None else model_fn
    with jax.enable_x64(True):
        noise = jnp.asarray(np.random.RandomState(0).randn(32))
        out = dj.sample_from_noise(model_fn, noise, config=config, num_inference_steps=n)
        s = np.asarray(dj.set_timesteps(config, n, (32,), dtype=jnp.float64).sigmas)
    alpha = np.ones_like(s) if config.is_ve else 1 / np.sqrt(1 + s**2)
    x_T = np.asarray(noise) * (s[0] if config.is_ve else 1.0)
    exact = gaussian_flow(x_T, alpha[0], s[0] * alpha[0], alpha[-1], s[-1] * alpha[-1])
    return np.abs(np.asarray(out) - exact).max() / np.abs(exact).max()


@pytest.mark.parametrize("variant,order", sorted(DESIGNED))
def test_empirical_convergence_order(variant, order):
    """Steps uniform in log rho on the continuous VP-linear schedule; slope of log error vs log N."""
    config = dj.DEISConfig(solver_type=variant, solver_order=order, time_schedule="vp_linear",
                           use_exponential_sigmas=True, lower_order_final=False)
    steps = (80, 160)
    errors = [gaussian_error(config, n) for n in steps]
    measured = -np.log(errors[1] / errors[0]) / np.log(steps[1] / steps[0])
    assert measured >= DESIGNED[variant, order] - 0.3, (errors, measured)


def test_high_order_error_keeps_falling_in_float64():
    config = dj.DEISConfig(solver_type="tab", solver_order=4, time_schedule="vp_linear",
                           timestep_spacing="quadratic", lower_order_final=False)
    errors = [gaussian_error(config, n) for n in (100, 200, 400)]
    assert errors[2] < errors[1] < errors[0] and errors[2] < 1e-7, errors


@pytest.mark.parametrize("variant", ["tab", "rhoab", "ipndm"])
@pytest.mark.parametrize("order", [2, 3, 4])
def test_multistep_rows_sum_to_ddim_weight(variant, order):
    """Lagrange bases sum to one, and the Adams-Bashforth weights too."""
    with jax.enable_x64(True):
        state = dj.set_timesteps(dj.DEISConfig(solver_type=variant, solver_order=order), 25, (1,),
                                 dtype=jnp.float64)
        alpha, sigma = schedule.alpha_sigma(state.config, state.sigmas)
    rho = np.asarray(sigma / alpha)
    np.testing.assert_allclose(np.asarray(state.weights).sum(1), np.asarray(alpha[1:]) * (rho[1:] - rho[:-1]),
                               rtol=1e-10)


@pytest.mark.parametrize("variant", ["tab", "rhoab", "ipndm", "rhork"])
def test_order_one_is_ddim_for_every_variant(variant):
    noise = jax.random.normal(jax.random.key(0), (3, 4))
    ours = dj.sample_from_noise(toy_model, noise, config=dj.DEISConfig(solver_type=variant, solver_order=1),
                                num_inference_steps=12)
    ddim = dj.sample_from_noise(toy_model, noise, config=dj.DEISConfig(solver_order=1), num_inference_steps=12)
    np.testing.assert_allclose(ours, ddim, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_rhork_exposes_every_evaluation(order):
    config = dj.DEISConfig(solver_type="rhork", solver_order=order)
    state = dj.set_timesteps(config, 6, (2,))
    assert state.timesteps.shape == (6 * order,) and state.sigmas.shape == (6 * order + 1,)
    calls = []

    def model_fn(x, t):
        jax.debug.callback(lambda t: calls.append(float(t)), t)
        return toy_model(x, t)

    out = dj.sample_from_noise(model_fn, jnp.ones(2), config=config, num_inference_steps=6)
    jax.effects_barrier()
    np.testing.assert_allclose(calls, np.asarray(state.timesteps), rtol=1e-6)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kwargs", [
    {"timestep_spacing": "quadratic"},
    {"solver_type": "tab", "use_karras_sigmas": True},
    {"solver_type": "tab", "use_exponential_sigmas": True, "beta_schedule": "squaredcos_cap_v2"},
    {"solver_type": "rhoab", "use_beta_sigmas": True},
])
@pytest.mark.parametrize("n", [5, 50, 500, 999])
def test_discrete_grids_are_rounded_and_strictly_decreasing(kwargs, n):
    state = dj.set_timesteps(dj.DEISConfig(**kwargs), n, (1,))
    t = np.asarray(state.timesteps)
    assert t.dtype == np.int32 and t.shape == (n,) and (np.diff(t) < 0).all() and t[-1] >= 1
    if kwargs.get("solver_type"):  # the model's timestep and the solver's sigma agree
        np.testing.assert_allclose(np.asarray(state.sigmas)[:-1], schedule.train_rhos(state.config)[t], rtol=1e-6)


def test_quadratic_is_uniform_in_sqrt_t():
    t = np.asarray(dj.set_timesteps(dj.DEISConfig(timestep_spacing="quadratic"), 10, (1,)).timesteps)
    np.testing.assert_allclose(np.sqrt(t), np.sqrt(999) * (1 - np.arange(10) / 10), atol=0.05)


@pytest.mark.parametrize("time_schedule", ["vp_linear", "vp_cosine"])
@pytest.mark.parametrize("variant", ["logrho", "tab", "rhoab", "ipndm", "rhork"])
@pytest.mark.parametrize("grid", [{}, {"timestep_spacing": "quadratic"}, {"use_karras_sigmas": True},
                                  {"use_exponential_sigmas": True}])
def test_continuous_time_models_get_float_timesteps(time_schedule, variant, grid):
    config = dj.DEISConfig(time_schedule=time_schedule, solver_type=variant, solver_order=2, **grid)
    state = dj.set_timesteps(config, 10, (4,))
    t = np.asarray(state.timesteps)
    decreasing = np.diff(t) <= 0 if variant == "rhork" else np.diff(t) < 0  # Heun re-evaluates at rho_{i+1}
    assert t.dtype == np.float32 and decreasing.all()
    assert config.t_min <= t.min() and t.max() <= config.t_max + 1e-6
    assert gaussian_error(config, 40) < 0.5 * gaussian_error(config, 10)


def test_continuous_config_validation():
    with pytest.raises(ValueError, match="time_schedule"):
        dj.DEISConfig(time_schedule="vp_exp")
    with pytest.raises(ValueError, match="t_max"):
        dj.DEISConfig(t_max=0.9)
    with pytest.raises(ValueError, match="time_schedule"):
        dj.DEISConfig(time_schedule="vp_linear", use_flow_sigmas=True)
    with pytest.raises(ValueError, match="solver_type"):
        dj.DEISConfig(solver_type="tab", solver_order=4).to_diffusers()
    assert dj.DEISConfig(time_schedule="vp_cosine").t_max == 0.9946


def test_public_lists():
    assert set(dj.SOLVER_TYPES) == {"logrho", "tab", "rhoab", "ipndm", "rhork"}
    assert set(dj.TIMESTEP_SPACINGS) == {"linspace", "leading", "trailing", "quadratic"}


def test_rhork_begin_index_counts_evaluations():
    state = dj.set_timesteps(dj.DEISConfig(solver_type="rhork", solver_order=2), 10, (2,))
    assert int(dj.set_begin_index(state, 4).step_index) == 4
    for bad in (3, 20):
        with pytest.raises(ValueError, match="begin_index"):
            dj.set_begin_index(state, bad)
    out = dj.img2img(toy_model, jnp.ones(2), jnp.zeros(2), strength=0.5, num_inference_steps=10,
                     config=state.config)
    assert np.isfinite(out).all()


def test_set_begin_index_keeps_the_requested_step_count():
    """rhork makes 122 model evaluations in 61 steps; re-planning must ask for 61 steps again."""
    state = dj.set_timesteps(dj.DEISConfig(solver_type="rhork", solver_order=2, timestep_spacing="trailing"), 61, (1,))
    again = dj.set_begin_index(state, 10)
    assert state.num_inference_steps == again.num_inference_steps == 122
    np.testing.assert_array_equal(state.timesteps, again.timesteps)
