"""Learned grids (deis_jax.learn): traced tables, gradients, the parametrisation, training, grid files."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import coefficients, learn, spacing
from helpers import benchmark_module, toy_model

acc = benchmark_module("accuracy")
pytest.importorskip("optax")

# Every supported solver type, on each kind of schedule that keeps a custom grid's sigmas.
SUPPORTED = [
    ("logrho", 3, {}),
    ("logrho", 2, {"time_schedule": "vp_cosine"}),
    ("rhoab", 4, {"time_schedule": "vp_linear"}),
    ("ipndm", 4, {"use_flow_sigmas": True, "flow_shift": 3.0}),
    ("rhoab", 3, {"use_flow_sigmas": True}),
]


def _config(solver_type="logrho", solver_order=3, **kw):
    return dj.DEISConfig(solver_type=solver_type, solver_order=solver_order, **kw)


def _random_grid(config, n, seed=0, scale=1.0):
    """A valid grid away from the config's own: the parametrisation at random logits (numpy float64)."""
    logits = learn.initial_logits(config, n) + scale * np.random.default_rng(seed).normal(size=n)
    return learn.sigmas_from_logits(config, logits, learn.grid_ends(config, n), xp=np)


@pytest.mark.parametrize("final", dj.FINAL_SIGMAS_TYPES)
@pytest.mark.parametrize("algorithm", dj.ALGORITHM_TYPES)
@pytest.mark.parametrize("solver_type,order,kw,n", [(*case, 7) for case in SUPPORTED] + [(*SUPPORTED[0], 16),
                                                                                          (*SUPPORTED[3], 16)])
def test_traced_tables_equal_the_host_build(solver_type, order, kw, n, algorithm, final):
    """grid_state's jnp build under jit equals set_timesteps(sigmas=)'s float64 numpy build of the same grid."""
    config = _config(solver_type, order, algorithm_type=algorithm, final_sigmas_type=final, **kw)
    sigmas = _random_grid(config, n)
    with jax.enable_x64(True):
        host = dj.set_timesteps(config, None, (2,), dtype=jnp.float64, sigmas=sigmas)
        traced = jax.jit(lambda s: learn.grid_state(config, s, (2,), jnp.float64))(jnp.asarray(sigmas))
    assert traced.weights.shape == host.weights.shape and traced.model_outputs.shape == host.model_outputs.shape
    np.testing.assert_array_equal(traced.orders, host.orders)
    for field in ("timesteps", "sigmas", "alpha_t", "sigma_t", "a", "b", "weights"):
        np.testing.assert_allclose(np.asarray(getattr(traced, field)), np.asarray(getattr(host, field)),
                                   rtol=1e-12, atol=1e-15, err_msg=field)


def test_traced_build_rejects_tab():
    config = _config("tab", 2, time_schedule="vp_linear")
    grid = spacing.grid(config, 5)
    with pytest.raises(ValueError, match="solver_type='tab'"):
        coefficients.build(config, spacing.Grid(*(jnp.asarray(v) for v in (grid.timesteps, grid.sigmas,
                                                                          grid.step_sigmas))), 0, xp=jnp)


def _central_difference(fn, x, i, h):
    e = np.zeros(x.shape)
    e[i] = h
    return float(fn(x + e) - fn(x - e)) / (2 * h)


def _assert_gradient_matches(fn, x, indices, relative_step):
    grad = np.asarray(jax.grad(fn)(x))
    fd = [_central_difference(fn, x, i, relative_step * max(abs(float(x[i])), 1e-3)) for i in indices]
    np.testing.assert_allclose(grad[indices], fd, rtol=1e-5, atol=1e-7 * np.abs(grad).max())


@pytest.mark.parametrize("kw", [
    {"time_schedule": "vp_linear"},
    {"time_schedule": "vp_cosine", "algorithm_type": "data_prediction", "final_sigmas_type": "zero"},
    {"solver_type": "rhoab", "solver_order": 3, "time_schedule": "vp_linear", "final_sigmas_type": "zero"},
])
def test_gradient_equals_finite_differences(kw):
    """d loss / d logits and d loss / d sigmas (interior) by jax.grad equal central differences (float64) on a
    continuous schedule, where the model's time t(rho) is differentiable too."""
    config = _config(**kw)
    n = 5
    problem = acc.Problem(components=3, dim=2, seed=0, batch=8)
    model = acc.model_jax(problem.mix, config)
    ends = learn.grid_ends(config, n)
    with jax.enable_x64(True):
        noise = jnp.asarray(problem.x_T)
        reference = dj.sample_from_noise(model, noise, config=config, num_inference_steps=40)
        loss_s = jax.jit(lambda s: learn.grid_loss(model, noise, reference, config, s))
        loss_z = jax.jit(lambda z: loss_s(learn.sigmas_from_logits(config, z, ends)))
        z = jnp.asarray(learn.initial_logits(config, n) + 0.3 * np.random.default_rng(1).normal(size=n))
        _assert_gradient_matches(loss_z, z, list(range(n)), 1e-5)
        _assert_gradient_matches(loss_s, learn.sigmas_from_logits(config, z, ends), list(range(1, n)), 1e-5)


@pytest.mark.parametrize("final", dj.FINAL_SIGMAS_TYPES)
def test_discrete_gradient_is_straight_through(final):
    """On a discrete schedule the model gets round(t(sigma)); the gradient is d/d sigma of the loss L(sigma, tau)
    with the model's times tau held, plus dL/d tau times the slope of the unrounded t(sigma), each term by
    central differences (float64, a model smooth in t)."""
    config = _config(final_sigmas_type=final)
    n = 5
    sigmas = _random_grid(config, n, seed=2, scale=0.3)
    with jax.enable_x64(True):
        noise = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
        reference = dj.sample_from_noise(toy_model, noise, config=config, num_inference_steps=30)
        grad = np.asarray(jax.grad(lambda s: learn.grid_loss(toy_model, noise, reference, config, s))(sigmas))
        tau0 = np.asarray(dj.set_timesteps(config, None, (4, 3), sigmas=sigmas).timesteps, np.float64)

        @jax.jit
        def held(s, tau):
            state = dataclasses.replace(learn.grid_state(config, s, noise.shape, jnp.float64), timesteps=tau)
            return jnp.mean((dj.run_loop(toy_model, noise, state) - reference) ** 2)

        log_rhos = dj.schedule.log_train_rhos(config)
        for i in range(1, n):
            h = 1e-5 * sigmas[i]
            d_sigma = _central_difference(lambda s: held(s, tau0), sigmas, i, h)
            d_tau = _central_difference(lambda t: held(sigmas, t), tau0, i, 1e-4)
            slope = float(np.diff(spacing.sigma_to_t(sigmas[i] + np.array([-h, h]), log_rhos))[0]) / (2 * h)
            np.testing.assert_allclose(grad[i], d_sigma + d_tau * slope, rtol=1e-5)


@pytest.mark.parametrize("final", dj.FINAL_SIGMAS_TYPES)
def test_discrete_table_gradient_equals_finite_differences(final):
    """With a model that ignores t the rounding of the times drops out: jax.grad equals central differences."""
    config = _config(final_sigmas_type=final, algorithm_type="data_prediction")
    n = 6
    model = lambda x, t: jnp.tanh(x)  # noqa: E731
    with jax.enable_x64(True):
        noise = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
        reference = dj.sample_from_noise(model, noise, config=config, num_inference_steps=30)
        loss = jax.jit(lambda s: learn.grid_loss(model, noise, reference, config, s))
        _assert_gradient_matches(loss, jnp.asarray(_random_grid(config, n, seed=3)), list(range(1, n)), 1e-5)


EXTREME_LOGITS = [np.zeros(6), np.array([1e4, -1e4, 0.0, 0.0, 50.0, -50.0]), np.array([-1e4] * 5 + [1e4]),
                  np.array([1e4] + [-1e4] * 5), np.array([0.0] * 5 + [1e4]), 30.0 * np.arange(-3, 3)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("final", dj.FINAL_SIGMAS_TYPES)
@pytest.mark.parametrize("kw", [{}, {"use_flow_sigmas": True, "flow_shift": 3.0}, {"time_schedule": "vp_cosine"},
                                {"timestep_spacing": "leading"}])
def test_every_iterate_is_a_valid_grid(kw, final, dtype):
    """Strictly decreasing with the config's ends fixed (0 last with final_sigmas_type="zero"), whatever the
    logits, and accepted by set_timesteps(sigmas=)."""
    config = _config(final_sigmas_type=final, **kw)
    n = 6
    ends = learn.grid_ends(config, n)
    with jax.enable_x64(dtype == jnp.float64):
        for logits in EXTREME_LOGITS:
            s = np.asarray(jax.jit(lambda z: learn.sigmas_from_logits(config, z, ends))(jnp.asarray(logits, dtype)))
            assert s.dtype == dtype and np.isfinite(s).all() and (np.diff(s) < 0).all(), (logits, s)
            first, last = np.asarray(ends, dtype)
            assert s[0] == first and s[-1] == (0.0 if final == "zero" else last)
            assert s[-2] > last or final == "sigma_min"
            dj.set_timesteps(config, n, (1,), sigmas=s)


@pytest.mark.parametrize("final", dj.FINAL_SIGMAS_TYPES)
@pytest.mark.parametrize("kw", [{}, {"timestep_spacing": "trailing"}, {"time_schedule": "vp_linear"},
                                {"time_schedule": "vp_cosine", "use_karras_sigmas": True}])
@pytest.mark.parametrize("n", [3, 10])
def test_training_starts_at_the_configs_own_grid(kw, final, n):
    """(Discrete Karras, exponential and beta grids for logrho, and flow grids, repeat their last sigma, as
    diffusers does: that step of length 0 starts at the shortest step the parametrisation allows.)"""
    config = _config(final_sigmas_type=final, **kw)
    start = learn.sigmas_from_logits(config, learn.initial_logits(config, n), learn.grid_ends(config, n), xp=np)
    own = spacing.grid(dataclasses.replace(config, final_sigmas_type="sigma_min"), n).step_sigmas
    if final == "zero":  # the sigma_min grid ending at 0 (a sigma grid's own "zero" grid is N levels, then 0)
        own[-1] = 0.0
        if not config.uses_sigma_grid:
            np.testing.assert_array_equal(own, spacing.grid(config, n).step_sigmas)
    np.testing.assert_allclose(start, own, rtol=1e-12)


@pytest.mark.parametrize("kw", [
    {"solver_order": 2},
    {"final_sigmas_type": "zero"},
    {"time_schedule": "vp_linear", "final_sigmas_type": "zero", "algorithm_type": "data_prediction"},
    {"solver_type": "ipndm", "time_schedule": "vp_linear"},
])
def test_learned_grid_reduces_held_out_error(kw):
    """Trained on one batch of x_T, the grid is scored on another (the problem's own x_T) against the exact
    solution of the probability-flow ODE (scipy DOP853)."""
    config = _config(**kw)
    n = 5
    problem = acc.Problem(components=4, dim=3, seed=0, batch=64)
    model = problem.model_for(config)
    train = np.random.default_rng(100).standard_normal((64, 3))

    def error(sigmas):
        x = dj.sample_from_noise(model, jnp.asarray(problem.x_T), config=config, sigmas=sigmas)
        return problem.error(np.asarray(x), sigmas)

    with jax.enable_x64(True):
        learned = dj.optimize_sigmas(model, train, config=config, num_inference_steps=n, train_steps=100)
        before, after = error(spacing.grid(config, n).step_sigmas), error(learned)
    assert learned.dtype == np.float64 and learned.shape == (n + 1,)
    assert after < 0.75 * before, (before, after, learned)


def test_float32_training_and_progress_bar(capsys):
    config = _config(time_schedule="vp_linear")
    problem = acc.Problem(components=2, dim=2, seed=0, batch=8)
    train = np.random.default_rng(100).standard_normal((8, 2)).astype(np.float32)
    grid = dj.optimize_sigmas(problem.model_for(config), train, config=config, num_inference_steps=4,
                              reference_steps=20, train_steps=3, progress=True)
    err = capsys.readouterr().err
    assert "optimize_sigmas" in err and "3/3" in err
    assert grid.dtype == np.float64 and (np.diff(grid) < 0).all()


@pytest.mark.parametrize("config", [
    dj.DEISConfig(),
    dj.DEISConfig(trained_betas=tuple(np.linspace(1e-4, 0.02, 1000) ** 1.1), final_sigmas_type="zero"),
    dj.DEISConfig(time_schedule="vp_cosine", solver_type="rhoab", algorithm_type="data_prediction"),
    dj.DEISConfig(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", solver_type="ipndm"),
])
def test_grid_files_round_trip(tmp_path, config):
    n = 6
    grid = _random_grid(config, n)
    path = tmp_path / "grid.json"
    dj.save_grid(path, config, grid)
    loaded_config, loaded = dj.load_grid(path)
    assert loaded_config == config and isinstance(loaded, np.ndarray)
    np.testing.assert_array_equal(loaded, grid)
    data = json.loads(path.read_text())
    assert data["format"] == "deis_jax.grid" and data["version"] == 1
    assert data["config"]["trained_betas"] == (None if config.trained_betas is None else list(config.trained_betas))
    noise = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
    np.testing.assert_array_equal(dj.sample_from_noise(toy_model, noise, config=loaded_config, sigmas=loaded),
                                  dj.sample_from_noise(toy_model, noise, config=config, sigmas=grid))


def test_bad_grid_files(tmp_path):
    path = tmp_path / "grid.json"
    dj.save_grid(path, dj.DEISConfig(), _random_grid(dj.DEISConfig(), 4))
    good = json.loads(path.read_text())
    for change, match in ((dict(version=2), "version 1"), (dict(format="other"), "format"),
                          (dict(config={**good["config"], "rho": 7.0}), "config"), (dict(config=None), "config"),
                          (dict(sigmas=good["sigmas"][::-1]), "sigmas")):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            dj.load_grid(path)
    with pytest.raises(ValueError, match="sigmas"):
        dj.save_grid(path, dj.DEISConfig(), [1.0, 2.0])
    with pytest.raises(ValueError, match="config"):
        dj.save_grid(path, {"solver_order": 2}, [1.0, 0.5])


def test_bad_input():
    problem = acc.Problem(components=2, dim=2, seed=0, batch=4)
    model, noise = problem.model_jax, problem.x_T
    config = dj.DEISConfig()

    def run(**kw):
        args = dict(config=config, num_inference_steps=4, train_steps=2) | kw
        return dj.optimize_sigmas(model, args.pop("noise", noise), **args)

    cases = [
        (dict(train_steps=0), "train_steps=0"), (dict(train_steps=-3), "train_steps"),
        (dict(train_steps=2.5), "train_steps"), (dict(train_steps=True), "train_steps"),
        (dict(num_inference_steps=1), "num_inference_steps=1"), (dict(num_inference_steps=1000), "num_inference_steps"),
        (dict(reference_steps=4), "reference_steps=4"),
        (dict(learning_rate=0.0), "learning_rate"), (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(noise=np.float32(1.0)), "noise"), (dict(noise=np.zeros((0, 2))), "noise"),
        (dict(noise=np.ones((4, 2), np.int32)), "noise"),
        (dict(config=_config("tab", 2, time_schedule="vp_linear")), "solver_type='tab'"),
        (dict(config=_config("rhork", 2, time_schedule="vp_linear")), "solver_type='rhork'"),
        (dict(config=_config("rhoab", 2)), "piecewise constant"),
        (dict(config=dj.DEISConfig(use_dynamic_shifting=True, use_flow_sigmas=True)), "use_dynamic_shifting"),
        (dict(config=dj.DEISConfig(trained_betas=(0.01,) * 9 + (1.0,), num_train_timesteps=10,
                                   prediction_type="v_prediction")), "zero terminal SNR"),
        (dict(config="logrho"), "config"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            run(**kw)


def test_packaged_grids_load_and_run():
    paths = sorted(name for name in os.listdir(learn.GRIDS_DIR) if name.endswith(".json"))
    assert paths, learn.GRIDS_DIR
    for name in paths:
        config, sigmas = dj.load_grid(os.path.join(learn.GRIDS_DIR, name))
        out = dj.sample_from_noise(toy_model, jnp.ones((2, 3)), config=config, sigmas=sigmas)
        assert np.isfinite(np.asarray(out)).all() and sigmas[0] > sigmas[1] > sigmas[-1] >= 0
