"""Where diffusers crashes on a configuration it accepts, and the helpers add_noise / scale_model_input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import schedule, spacing
from deis_jax.schedule import alpha_sigma
from helpers import deis_trajectory, gaussian_eps_model, gaussian_flow, initial_noise, toy_model


@pytest.mark.parametrize("sigmas", ["use_karras_sigmas", "use_beta_sigmas"])
def test_repeated_first_timestep_runs_every_step(sigmas):
    """Karras/beta sigmas on the cosine schedule repeat the first timestep (999, 999, ...).

    diffusers looks up the start index by timestep value, takes the second match and then
    indexes past the end of its sigmas (IndexError). deis_jax carries the step index, so it
    takes all N steps with a finite result. With Karras sigmas, on Gaussian data and the exact
    noise model, it lands within 3% of the exact ODE solution. (Beta sigmas are linear in
    sigma, so their last step jumps from sigma ~0.5 to sigma_min: large error for any solver,
    diffusers' numbers included; only finiteness is asserted for them.)
    """
    config = dj.DEISConfig(beta_schedule="squaredcos_cap_v2", solver_order=3, **{sigmas: True})
    timesteps, _ = spacing.timesteps_and_sigmas(config, 20)
    assert timesteps[0] == timesteps[1]
    x_T = jnp.asarray(initial_noise((64,)))
    out = dj.sample_from_noise(gaussian_eps_model(config), x_T, config=config, num_inference_steps=20)
    state = dj.set_timesteps(config, 20, (64,))
    (a0, aN), (s0, sN) = (np.asarray(v)[[0, -1]] for v in alpha_sigma(config, state.sigmas))
    exact = gaussian_flow(np.asarray(x_T) * s0, a0, s0, aN, sN)  # x_T is scaled noise at sigma_0
    assert np.isfinite(out).all()
    if sigmas == "use_karras_sigmas":
        np.testing.assert_allclose(out, exact, atol=0.03 * np.abs(exact).max())


def test_diffusers_crashes_where_we_do_not():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DEISMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    sched.set_timesteps(20)
    x = torch.zeros(1, 4)
    with pytest.raises(IndexError):
        for t in sched.timesteps:
            x = sched.step(torch.tanh(x), t, x).prev_sample


def _threshold_reference(x0, ratio, max_value):
    flat = x0.reshape(x0.shape[0], -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1, keepdims=True), 1.0, max_value)
    return (np.clip(flat, -s, s) / s).reshape(x0.shape)


def test_thresholding_on_2d_samples():
    """diffusers' `_threshold_sample` fails on (batch, features) samples; here each row is
    thresholded over its features, the same rule as for images."""
    config = dj.DEISConfig(prediction_type="sample", thresholding=True, sample_max_value=2.0,
                           dynamic_thresholding_ratio=0.9)
    state = dj.set_timesteps(config, 10, (3, 16))
    x = jnp.asarray(initial_noise((3, 16)))
    m = 3.0 * jnp.asarray(initial_noise((3, 16), seed=1))
    eps = dj.convert_model_output(state, m, x)
    x0 = _threshold_reference(np.asarray(m), 0.9, 2.0)
    expected = (np.asarray(x) - state.alpha_t[0] * x0) / state.sigma_t[0]
    np.testing.assert_allclose(eps, expected, rtol=1e-5, atol=1e-5)
    _, traj = deis_trajectory(config, 10, np.asarray(x))
    assert np.isfinite(traj).all()


def test_add_noise_formula_and_lookup():
    state = dj.set_timesteps(dj.DEISConfig(), 10, (2, 3))
    x0, noise = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    t = state.timesteps[jnp.array([0, 4])]
    out = dj.add_noise(state, x0, noise, t)
    s = np.asarray(state.sigmas)[[0, 4]]
    alpha = 1 / np.sqrt(1 + s**2)
    np.testing.assert_allclose(out, (alpha * 1.0 + s * alpha * 2.0)[:, None] * np.ones((2, 3)), rtol=1e-6)
    # a timestep absent from the schedule maps to the last step, as in diffusers
    last = dj.add_noise(state, x0, noise, jnp.array(12345))
    np.testing.assert_allclose(last, dj.add_noise(state, x0, noise, state.timesteps[-1]), rtol=1e-6)


def test_add_noise_takes_the_second_of_repeated_timesteps():
    """Without torch: a timestep that appears twice takes the sigma of its second occurrence
    (diffusers' `index_for_timestep`), alpha = 1 / sqrt(1 + s^2), sigma = s alpha."""
    config = dj.DEISConfig(beta_schedule="squaredcos_cap_v2", use_exponential_sigmas=True)
    state = dj.set_timesteps(config, 50, (1,))
    t, s = np.asarray(state.timesteps), np.asarray(state.sigmas)
    values, counts = np.unique(t, return_counts=True)
    repeated = values[counts == 2][-1]  # exactly twice (997)
    second = np.flatnonzero(t == repeated)[1]
    assert s[second] != s[second - 1]
    out = dj.add_noise(state, jnp.ones(1), jnp.full(1, 2.0), jnp.asarray(repeated))
    alpha = 1 / np.sqrt(1 + s[second].astype(np.float64) ** 2)
    np.testing.assert_allclose(out, alpha * (1.0 + 2.0 * s[second]), rtol=1e-6)


def test_add_noise_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    for kw in ({}, {"use_flow_sigmas": True, "flow_shift": 3.0}, {"use_karras_sigmas": True}):
        sched = diffusers.DEISMultistepScheduler(**kw)
        sched.set_timesteps(15)
        state = dj.set_timesteps(dj.DEISConfig(**kw), 15, (3, 2, 4))
        x0, noise = initial_noise((3, 2, 4)), initial_noise((3, 2, 4), seed=1)
        t = sched.timesteps[[0, 5, 14]]
        ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        ours = dj.add_noise(state, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t.numpy()))
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


REPEATING = [  # schedules whose timesteps repeat (diffusers' values: rounded or truncated sigma grids)
    ({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 20),
    ({"beta_schedule": "squaredcos_cap_v2", "use_beta_sigmas": True}, 20),
    ({"beta_schedule": "squaredcos_cap_v2", "use_exponential_sigmas": True}, 50),
    ({"use_karras_sigmas": True}, 200),
    ({"use_flow_sigmas": True, "flow_shift": 3.0}, 500),
]


@pytest.mark.parametrize("kwargs,n", REPEATING)
def test_add_noise_matches_diffusers_where_timesteps_repeat(kwargs, n):
    """Every timestep of the schedule at once: one that appears several times takes the sigma of
    its second occurrence (diffusers' `index_for_timestep`). The signal and noise terms are
    compared separately, so that neither hides the other (at rho ~ 1e4, alpha_t is 1e-4)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DEISMultistepScheduler(**kwargs)
    sched.set_timesteps(n)
    timesteps = sched.timesteps
    assert len(np.unique(timesteps.numpy())) < len(timesteps)
    shape = (len(timesteps), 3)
    state = dj.set_timesteps(dj.DEISConfig(**kwargs), n, shape)
    np.testing.assert_array_equal(state.timesteps, timesteps.numpy())
    zeros = np.zeros(shape, np.float32)
    for x0, noise in ((initial_noise(shape), zeros), (zeros, initial_noise(shape, seed=1))):
        ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps).numpy()
        ours = dj.add_noise(state, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps.numpy()))
        np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_scale_model_input_is_identity():
    state = dj.set_timesteps(dj.DEISConfig(), 5, (2,))
    x = jnp.array([1.0, 2.0])
    assert dj.scale_model_input(state, x, state.timesteps[0]) is x


def test_float64_end_to_end():
    with jax.enable_x64(True):
        out = dj.sample(lambda x, t: 0.1 * x, jax.random.key(0), (3,), dtype=jnp.float64, num_inference_steps=10)
        assert out.dtype == jnp.float64


def test_large_betas_that_keep_alpha_bar_positive_run():
    config = dj.DEISConfig(beta_end=0.1)  # alpha_bar_999 ~ 1e-22: positive in float32
    assert np.isfinite(dj.sample(toy_model, jax.random.key(0), (2, 3), config=config, num_inference_steps=10)).all()


def test_two_training_timesteps():
    """num_train_timesteps = 2, the smallest accepted: one step, from t = 1 to sigma(t = 0)."""
    config = dj.DEISConfig(num_train_timesteps=2)
    state = dj.set_timesteps(config, 1, (3,))
    rhos = schedule.train_rhos(config)
    assert state.timesteps.tolist() == [1]
    np.testing.assert_allclose(state.sigmas, rhos[::-1], rtol=1e-6)
    x, eps = jnp.array([0.3, -1.0, 2.0]), jnp.array([0.5, 0.1, -0.7])
    alpha = 1 / np.sqrt(1 + rhos**2)  # one DDIM step: alpha_0 (x - sigma_1 eps) / alpha_1 + sigma_0 eps
    expected = alpha[0] * (x - rhos[1] * alpha[1] * eps) / alpha[1] + rhos[0] * alpha[0] * eps
    out = dj.sample_from_noise(lambda x, t: eps, x, config=config, num_inference_steps=1)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="num_inference_steps=2"):
        dj.set_timesteps(config, 2, (3,))
