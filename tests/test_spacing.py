"""The step grid at its limits: the maximum step count with every grid, and where the loop starts."""

import itertools
import os
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import schedule, spacing
from helpers import toy_model

SIGMA_GRIDS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@pytest.mark.parametrize("solver_type,grid,spacing_name", list(itertools.product(
    ("tab", "rhoab", "ipndm", "rhork"), SIGMA_GRIDS + (None,), ("linspace", "leading", "trailing", "quadratic"))))
def test_maximum_step_count_ends_at_the_clean_end(solver_type, grid, spacing_name):
    """At the largest accepted step count every grid falls and ends at the training sigma of t = 0;
    one step more is rejected. A sigma grid rounded to N + 1 distinct timesteps in 0..999 holds at
    most 999 steps, whatever the spacing; diffusers' trailing spacing takes all 1000 timesteps, so its
    last step, from t = 0 to sigma(t = 0), has length zero (as in diffusers)."""
    kwargs = {grid: True} if grid else {}
    order = 1 if solver_type == "rhork" else 2  # rhork: 999 steps x order evaluations
    config = dj.DEISConfig(solver_type=solver_type, solver_order=order, timestep_spacing=spacing_name, **kwargs)
    limit = spacing.max_inference_steps(config)
    expected_limit = 1000 if (spacing_name == "trailing" and grid is None) else 999
    assert limit == expected_limit
    state = dj.set_timesteps(config, limit, (1,))
    sigmas = np.asarray(state.sigmas, np.float64)
    falls = np.diff(sigmas) < 0
    if expected_limit == 1000:
        assert sigmas[-1] == sigmas[-2]
        falls = falls[:-1]
    assert np.all(falls), "sigmas must fall strictly"
    assert sigmas[-1] == pytest.approx(float(schedule.train_rhos(config)[0]), rel=1e-6)
    assert len(state.timesteps) == limit
    with pytest.raises(ValueError, match="num_inference_steps"):
        dj.set_timesteps(config, limit + 1, (1,))


def test_set_begin_index_keeps_mu():
    """With dynamic shifting the schedule of set_begin_index(state, i) is the one set_timesteps built."""
    config = dj.DEISConfig(use_flow_sigmas=True, use_dynamic_shifting=True, prediction_type="flow_prediction")
    state = dj.set_timesteps(config, 10, (2,), mu=1.5)
    moved = dj.set_begin_index(state, 4)
    other = dj.set_timesteps(config, 10, (2,), mu=0.5)
    assert not np.allclose(state.sigmas, other.sigmas)  # mu matters
    np.testing.assert_array_equal(moved.sigmas, state.sigmas)
    np.testing.assert_array_equal(moved.timesteps, state.timesteps)
    assert moved.mu == 1.5 and int(moved.step_index) == 4


def _hand_loop(state, x):
    for t in state.timesteps[int(state.step_index):]:
        x, state = dj.step(state, toy_model(x, t), t, x)
    return x


@pytest.mark.parametrize("config", [dj.DEISConfig(solver_order=3), dj.DEISConfig(solver_type="rhork", solver_order=2)])
def test_run_loop_starts_where_the_state_starts(config):
    """run_loop takes its start from the state: from set_begin_index(state, i) it runs steps i..N-1,
    equal to a hand-written loop from there."""
    x = jnp.asarray(np.random.RandomState(0).randn(2, 3), jnp.float32)
    state = dj.set_begin_index(dj.set_timesteps(config, 10, x.shape), 4)
    calls = []

    def counting_model(x, t):
        jax.debug.callback(lambda t: calls.append(float(t)), t)
        return toy_model(x, t)

    out = dj.run_loop(counting_model, x, state)
    np.testing.assert_allclose(out, _hand_loop(state, x), rtol=1e-5, atol=1e-6)
    assert calls == [float(t) for t in np.asarray(state.timesteps)[4:]]


def test_run_loop_rejects_a_state_that_has_taken_steps():
    state = dj.set_timesteps(dj.DEISConfig(), 10, (2,))
    x = jnp.ones((2,))
    _, stepped = dj.step(state, toy_model(x, state.timesteps[0]), state.timesteps[0], x)
    with pytest.raises(ValueError, match="^state.step_index=1 is invalid for run_loop"):
        dj.run_loop(toy_model, x, stepped)


@pytest.mark.parametrize("time_schedule", ["vp_linear", "vp_cosine"])
def test_add_noise_on_continuous_time_uses_the_schedule_at_t(time_schedule):
    """alpha_t x0 + sigma_t eps with alpha_t, sigma_t from t itself, also between grid times."""
    config = dj.DEISConfig(time_schedule=time_schedule)
    state = dj.set_timesteps(config, 5, (3,))
    x0, noise = jnp.array([0.5, -1.0, 2.0]), jnp.array([1.0, 0.3, -0.2])
    for t in (0.8002, float(state.timesteps[2]), 0.0123):
        rho = float(schedule.continuous_rho(config, np.float64(t)))
        alpha = 1.0 / np.sqrt(1.0 + rho**2)
        expected = alpha * np.asarray(x0) + rho * alpha * np.asarray(noise)
        np.testing.assert_allclose(dj.add_noise(state, x0, noise, jnp.float32(t)), expected, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("grid", SIGMA_GRIDS)
def test_zero_terminal_snr_with_a_sigma_grid_is_rejected(prediction_type, grid):
    """The grid would start at sigma = inf (NaN grid before); epsilon prediction clamps and runs."""
    from test_reliability import _rescaled_zero_snr_betas

    betas = _rescaled_zero_snr_betas()
    with pytest.raises(ValueError, match=f"{grid}.*zero-terminal-SNR"):
        dj.DEISConfig(trained_betas=betas, prediction_type=prediction_type, **{grid: True})
    clamped = dj.DEISConfig(trained_betas=betas, prediction_type="epsilon", **{grid: True})
    out = dj.sample(lambda x, t: 0.1 * x, jax.random.key(0), (2, 3), config=clamped, num_inference_steps=10)
    assert np.isfinite(np.asarray(out)).all()


README = os.path.join(os.path.dirname(__file__), "..", "README.md")
SCHEDULE_ROWS = {  # README row label -> config fields
    "discrete (betas, `trained_betas`)": {}, "discrete": {"beta_schedule": "squaredcos_cap_v2"},
    "flow (`use_flow_sigmas`)": {"use_flow_sigmas": True}, "flow": {"use_flow_sigmas": True, "flow_shift": 3.0},
    "continuous (`vp_linear`, `vp_cosine`)": {"time_schedule": "vp_linear"},
    "variance exploding (`ve`)": {"time_schedule": "ve"},
    "variance exploding, `ve_time_input=\"c_noise\"`": {"time_schedule": "ve", "ve_time_input": "c_noise"},
}


def _model_time_rows():
    text = open(README).read().split("What `t` is, for each schedule and solver")[1]
    for line in text.split("\n\n")[1].splitlines()[2:]:
        schedule_name, solvers, what = (cell.strip() for cell in line.strip("|").split("|"))
        names = dj.SOLVER_TYPES if solvers == "all" else [s.strip(" `") for s in solvers.split(",")]
        yield schedule_name, names, what


@pytest.mark.parametrize("schedule_name,solver_types,what", list(_model_time_rows()))
def test_readme_says_what_the_model_receives(schedule_name, solver_types, what):
    """The README's table of the model's time input is what model_fn gets: dtype, 0-d, range."""
    for solver_type in solver_types:
        config = dj.DEISConfig(solver_type=solver_type, **SCHEDULE_ROWS[schedule_name])
        state = dj.set_timesteps(config, 7, (2,))
        seen = []
        dj.run_loop(lambda x, t, seen=seen: (seen.append(t), 0.1 * x)[1], jnp.ones((2,)), state)
        assert seen[0].shape == () and seen[0].dtype == jnp.dtype(what.split(":")[0]), (solver_type, seen[0])
        t = np.asarray(state.timesteps, np.float64)
        if config.is_continuous:  # [t_min, t_max], or the times of [sigma_min, sigma_max] (VE), in float32
            t_lo, t_hi = np.asarray(schedule.time_range(config), state.timesteps.dtype)
            assert t_lo <= t.min() and t.max() <= t_hi
        elif config.use_flow_sigmas:  # s * N with s in (0, 1]
            assert 0 < t.min() and t.max() <= config.num_train_timesteps
        else:
            assert 0 <= t.min() and t.max() <= config.num_train_timesteps - 1
            fractional = np.any(t != np.round(t))
            assert fractional == (solver_type == "rhork"), (solver_type, t)


@pytest.mark.parametrize("kwargs,expected", [
    ({"timestep_spacing": "linspace"}, [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]),
    ({"timestep_spacing": "leading"}, [900, 810, 720, 630, 540, 450, 360, 270, 180, 90]),
    ({"timestep_spacing": "leading", "steps_offset": 1}, [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]),
    ({"timestep_spacing": "trailing"}, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ({"timestep_spacing": "quadratic"}, [999, 809, 639, 490, 360, 250, 160, 90, 40, 10]),
])
def test_spaced_timesteps_follow_diffusers_rules(kwargs, expected):
    """10 of 1000 steps, by hand from diffusers' rules: linspace round(linspace(0, 999, 11)) (499.5 -> 500);
    leading k * (1000 // 11) + steps_offset; trailing round(arange(1000, 0, -100)) - 1; quadratic
    round(999 (1 - k / 10)^2); each descending, the last point dropped."""
    state = dj.set_timesteps(dj.DEISConfig(**kwargs), 10, (1,))
    assert np.asarray(state.timesteps).tolist() == expected


def test_sigma_to_t_clamps_outside_the_training_range():
    """Exact at the end points of the training rhos, clamped to 0 and 999 beyond them."""
    rhos = schedule.train_rhos(dj.DEISConfig())
    sigma = np.array([1e6, rhos[-1], rhos[0], 1e-9])
    np.testing.assert_allclose(spacing.sigma_to_t(sigma, np.log(rhos)), [999, 999, 0, 0], atol=1e-9)


def test_discrete_sigma_grid_spans_the_training_range():
    """A Karras grid rounded for rhoab starts at the last training timestep, at its training sigma."""
    config = dj.DEISConfig(solver_type="rhoab", use_karras_sigmas=True)
    state = dj.set_timesteps(config, 10, (1,))
    assert int(state.timesteps[0]) == 999
    np.testing.assert_allclose(float(state.sigmas[0]), schedule.train_rhos(config)[-1], rtol=1e-6)


@pytest.mark.parametrize("grid", ["quadratic", "karras"])
def test_continuous_grids_from_t_max_to_t_min(grid):
    """Continuous time, 8 steps from t_max (not 1, where t_max**p = t_max) to t_min: quadratic is uniform
    in sqrt(t); Karras is uniform in rho^(1/7) between rho(t_max) and rho(t_min)."""
    kwargs = {"timestep_spacing": "quadratic"} if grid == "quadratic" else {"use_karras_sigmas": True}
    config = dj.DEISConfig(time_schedule="vp_linear", t_max=0.8, **kwargs)
    with jax.enable_x64(True):
        state = dj.set_timesteps(config, 8, (1,), dtype=jnp.float64)
    t, rho = np.asarray(state.timesteps), np.asarray(state.sigmas)
    ends = schedule.continuous_rho(config, np.array([config.t_max, config.t_min]))
    np.testing.assert_allclose(rho[[0, -1]], ends, rtol=1e-10)
    if grid == "quadratic":
        np.testing.assert_allclose(t, np.linspace(config.t_max**0.5, config.t_min**0.5, 9)[:-1] ** 2, rtol=1e-12)
    else:
        assert t[0] == config.t_max
        r = rho ** (1 / 7)
        np.testing.assert_allclose(np.diff(r), np.full(8, (r[-1] - r[0]) / 8), rtol=1e-6)


@pytest.mark.parametrize("num_train_timesteps,n", [(1000, 61), (1000, 998), (15, 13)])
def test_trailing_spacing_takes_exactly_the_requested_steps(num_train_timesteps, n):
    """Trailing timesteps are round(N_train - k N_train / N) - 1 for k < N. diffusers computes them with
    np.arange(N_train, 0, -N_train / N), which float rounding makes one element longer for some N
    (61 of 1000): a timestep -1 past the end, two zero-length steps and N + 1 model evaluations."""
    config = dj.DEISConfig(num_train_timesteps=num_train_timesteps, timestep_spacing="trailing")
    state = dj.set_timesteps(config, n, (1,))
    ratio = Fraction(num_train_timesteps, n)
    expected = [round(num_train_timesteps - k * ratio) - 1 for k in range(n)]  # exact, half to even
    np.testing.assert_array_equal(state.timesteps, expected)
    sigmas = np.asarray(state.sigmas)
    assert np.all(np.diff(sigmas[:-1]) < 0)
    assert sigmas[-1] < sigmas[-2] or expected[-1] == 0  # a last step from t = 0 to sigma(t = 0) has length zero


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("kwargs", [{}, {"time_schedule": "vp_cosine", "timestep_spacing": "quadratic"},
                                    {"time_schedule": "vp_linear"}, {"use_flow_sigmas": True, "flow_shift": 3.0}])
def test_rhork_stages_stay_within_their_step(kwargs, order):
    """Stage s of step i is at rho_i + c_s (rho_{i+1} - rho_i): a stage with c = 1 is the step's end
    exactly (rounding must not put it past the end, below the last sigma, where a continuous model
    would get t < t_min), and evaluation sigmas never increase."""
    config = dj.DEISConfig(solver_type="rhork", solver_order=order, **kwargs)
    c = np.asarray(dj.config.RUNGE_KUTTA[order][0])
    for n in (1, 2, 7):
        grid = spacing.grid(config, n, None)
        stages = grid.sigmas[:-1].reshape(n, order)
        rtol = 1e-15 if config.use_flow_sigmas else 0  # flow: s -> rho -> s rounds
        np.testing.assert_allclose(stages[:, c == 1][:, 0], grid.step_sigmas[1:], rtol=rtol, atol=0)
        np.testing.assert_allclose(stages[:, c == 0][:, 0], grid.step_sigmas[:-1], rtol=rtol, atol=0)
        assert np.all(np.diff(grid.sigmas) <= 0)
        if config.is_continuous:
            assert config.t_min <= grid.timesteps.min() and grid.timesteps.max() <= config.t_max


def test_leading_spacing_keeps_timesteps_below_num_train_timesteps():
    """diffusers' leading timesteps are k (N_train // (N + 1)) + steps_offset, k = N..1; a step count
    whose first timestep would pass N_train - 1 is rejected (with steps_offset=1, N = 999 would start
    at t = 1000 and clamp its sigma to sigma(999), a zero-length first step), and every other is taken."""
    config = dj.DEISConfig(timestep_spacing="leading", steps_offset=1)
    assert spacing.max_inference_steps(config) == 998
    assert np.asarray(dj.set_timesteps(config, 998, (1,)).timesteps).max() == 999
    with pytest.raises(ValueError, match="num_inference_steps=999"):
        dj.set_timesteps(config, 999, (1,))
    config = dj.DEISConfig(timestep_spacing="leading", steps_offset=2)  # N = 499: 499 * 2 + 2 = 1000
    with pytest.raises(ValueError, match="num_inference_steps=499 .*steps_offset=2"):
        dj.set_timesteps(config, 499, (1,))
    for n in (498, 500, 997):
        t = np.asarray(dj.set_timesteps(config, n, (1,)).timesteps)
        assert t.max() == n * (1000 // (n + 1)) + 2 <= 999 and np.all(np.diff(t) < 0)


@pytest.mark.parametrize("mu", [20.0, -110.0])
def test_mu_that_pushes_flow_sigmas_to_one_or_zero_is_rejected(mu):
    """exp(20) puts the first flow sigma at 1 in float32 (alpha = 0, NaN weights before); exp(-110)
    puts the last at 0."""
    config = dj.DEISConfig(use_flow_sigmas=True, use_dynamic_shifting=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match=f"mu={mu}"):
        dj.set_timesteps(config, 10, (2,), mu=mu)
    assert np.isfinite(np.asarray(dj.set_timesteps(config, 10, (2,), mu=mu / 2).weights)).all()


@pytest.mark.parametrize("time_schedule,t_max", [("vp_linear", 0.5), ("vp_cosine", None)])
def test_continuous_quadratic_grid_starts_and_ends_exactly_at_t_max_and_t_min(time_schedule, t_max):
    """Uniform in sqrt(t): (sqrt(0.5))**2 = 0.5000000000000001 put the first model time past t_max."""
    config = dj.DEISConfig(time_schedule=time_schedule, timestep_spacing="quadratic", t_min=1e-5, t_max=t_max)
    for n in (1, 7, 100):
        grid = spacing.grid(config, n)
        assert grid.timesteps[0] == config.t_max and grid.timesteps.max() <= config.t_max
        assert grid.sigmas[-1] == schedule.continuous_rho(config, np.float64(config.t_min))


@pytest.mark.parametrize("kwargs", [{"solver_type": "tab"}, {"solver_type": "rhork"},
                                    {"solver_type": "rhoab", "use_karras_sigmas": True}])
def test_flat_top_of_the_schedule_gives_finite_model_times(kwargs):
    """beta_end = 0 makes the last two training rhos equal; the time of a sigma on that flat piece
    interpolated 0 / 0 = NaN (tab then had NaN weights). Any timestep of the flat piece is right."""
    config = dj.DEISConfig(beta_end=0.0, **kwargs)
    rhos = schedule.train_rhos(config)
    assert rhos[-1] == rhos[-2]
    assert spacing.sigma_to_t(rhos[-1:].astype(np.float64), np.log(rhos).astype(np.float64))[0] in (998, 999)
    for n in (1, 5):
        state = dj.set_timesteps(config, n, (1,))
        assert np.isfinite(np.asarray(state.timesteps, np.float64)).all()
        assert np.isfinite(np.asarray(state.weights)).all()
