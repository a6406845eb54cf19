"""The per-step weights: invariants, closed form against quadrature, effective orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import coefficients, schedule, spacing
from deis_jax.schedule import alpha_sigma


def _lag_weights(state):
    """c[i, j] (by lag) recovered from the slot-ordered state.weights."""
    n, order = state.weights.shape
    slots = (np.arange(n)[:, None] - np.arange(order)[None, :]) % order
    return np.take_along_axis(np.asarray(state.weights), slots, axis=1)


def _alpha_rho(state):
    alpha, sigma = alpha_sigma(state.config, state.sigmas)
    return np.asarray(alpha), np.asarray(sigma / alpha)


CONFIGS = [dj.DEISConfig(solver_order=o, **kw) for o in (1, 2, 3) for kw in (
    {}, {"use_karras_sigmas": True}, {"use_flow_sigmas": True, "flow_shift": 3.0},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"})]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n", [5, 14, 15, 16, 40])
def test_rows_sum_to_first_order_weight(config, n):
    """The Lagrange basis sums to 1, so each row of c sums to alpha_{i+1} (rho_{i+1} - rho_i)."""
    with jax.enable_x64(True):
        state = dj.set_timesteps(config, n, (1,), dtype=jnp.float64)
        alpha, rho = _alpha_rho(state)
        c = _lag_weights(state)
    np.testing.assert_allclose(c.sum(axis=1), alpha[1:] * (rho[1:] - rho[:-1]), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(state.a), alpha[1:] / alpha[:-1], rtol=1e-12)


def test_order_one_is_ddim():
    """x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} eps with x0 = (x - sigma_i eps) / alpha_i."""
    config = dj.DEISConfig(solver_order=1)
    state = dj.set_timesteps(config, 10, (3,))
    x, eps = jnp.array([0.3, -1.2, 2.0]), jnp.array([0.5, 0.1, -0.7])
    alpha, sigma = alpha_sigma(config, state.sigmas)
    for i in range(10):
        prev, state = dj.step(state, eps, state.timesteps[i], x)
        x0 = (x - sigma[i] * eps) / alpha[i]
        np.testing.assert_allclose(prev, alpha[i + 1] * x0 + sigma[i + 1] * eps, rtol=2e-5, atol=1e-6)
        x = prev


@pytest.mark.parametrize("order", [2, 3])
def test_closed_form_equals_quadrature(order):
    """c_{i,j} = alpha_{i+1} * integral of the log-rho Lagrange basis, by 64-point Gauss-Legendre."""
    nodes, weights = np.polynomial.legendre.leggauss(64)
    with jax.enable_x64(True):
        state = dj.set_timesteps(dj.DEISConfig(solver_order=order, lower_order_final=False), 12, (1,),
                                 dtype=jnp.float64)
        alpha, rho = _alpha_rho(state)
        c = _lag_weights(state)
    for i in range(order - 1, 12):
        lo, hi = rho[i], rho[i + 1]
        r = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
        u, u_nodes = np.log(r), np.log(rho[i - np.arange(order)])
        for j in range(order):
            ell = np.prod([(u - u_nodes[m]) / (u_nodes[j] - u_nodes[m]) for m in range(order) if m != j], axis=0)
            expected = alpha[i + 1] * 0.5 * (hi - lo) * np.sum(weights * ell)
            np.testing.assert_allclose(c[i, j], expected, rtol=1e-10, atol=1e-14)


def test_polynomials_in_log_rho_are_integrated_exactly():
    """With eps = p(log rho), deg p < order, a step from the exact x_i lands on the exact x_{i+1}.

    Exact solution of d(x/alpha)/d rho = p(log rho): x/alpha = 1.5 + F(rho) - F(rho_0), with
    F(r) = r (p(log r) - p'(log r) + p''(log r)).
    """
    p = lambda u: 0.3 - 0.7 * u + 0.2 * u**2  # noqa: E731
    F = lambda r: r * (p(np.log(r)) - (-0.7 + 0.4 * np.log(r)) + 0.4)  # noqa: E731
    with jax.enable_x64(True):
        state = dj.set_timesteps(dj.DEISConfig(solver_order=3, lower_order_final=False), 8, (1,),
                                 dtype=jnp.float64)
        alpha, rho = _alpha_rho(state)
        exact = alpha * (1.5 + F(rho) - F(rho[0]))
        for i in range(8):
            out, state = dj.step(state, jnp.array([p(np.log(rho[i]))]), state.timesteps[i], jnp.array([exact[i]]))
            if i >= 2:  # past the warm-up, every step is third order
                np.testing.assert_allclose(float(out[0]), exact[i + 1], rtol=1e-10)


@pytest.mark.parametrize("n,lower_order_final,expected_tail", [
    (14, True, [3, 2, 1]), (15, True, [3, 3, 3]), (16, True, [3, 3, 3]), (14, False, [3, 3, 3]),
])
def test_effective_orders(n, lower_order_final, expected_tail):
    state = dj.set_timesteps(dj.DEISConfig(solver_order=3, lower_order_final=lower_order_final), n, (1,))
    orders = np.asarray(state.orders)
    assert orders[:3].tolist() == [1, 2, 3]
    assert orders[-3:].tolist() == expected_tail


def test_begin_index_restarts_warm_up():
    state = dj.set_begin_index(dj.set_timesteps(dj.DEISConfig(solver_order=3), 20, (1,)), 7)
    assert int(state.step_index) == 7
    assert np.asarray(state.orders)[7:10].tolist() == [1, 2, 3]


def test_repeated_sigmas_lower_the_order_instead_of_dividing_by_zero():
    sigmas = np.array([5.0, 3.0, 3.0, 2.0, 1.0, 0.5])
    config = dj.DEISConfig(solver_order=3, lower_order_final=False)
    assert coefficients.effective_orders(config, sigmas, 0).tolist() == [1, 2, 1, 2, 3]


def test_max_inference_steps():
    assert spacing.max_inference_steps(dj.DEISConfig()) == 999
    assert spacing.max_inference_steps(dj.DEISConfig(timestep_spacing="trailing")) == 1000


TAB_CASES = [({}, 5, 2), ({}, 12, 3), ({"timestep_spacing": "quadratic"}, 5, 4),
             ({"timestep_spacing": "quadratic"}, 12, 2), ({"use_karras_sigmas": True}, 5, 3),
             ({"use_karras_sigmas": True}, 12, 4)]


@pytest.mark.parametrize("kwargs,n,order", TAB_CASES)
def test_tab_weights_equal_adaptive_quadrature_on_discrete_schedules(kwargs, n, order):
    """c_{i,j} = alpha_{i+1} * integral_{rho_i}^{rho_{i+1}} ell_j(t(rho)) d rho, ell_j the Lagrange basis
    in the model time through t_i, t_{i-1}, ... (k_i nodes), t(rho) linear in log rho between the
    training timesteps (the inverse of `schedule.rho_at`). Reference: scipy's adaptive quadrature in
    rho, told where the kinks of t(rho) are."""
    integrate = pytest.importorskip("scipy.integrate")
    config = dj.DEISConfig(solver_type="tab", solver_order=order, **kwargs)
    with jax.enable_x64(True):
        state = dj.set_timesteps(config, n, (1,), dtype=jnp.float64)
        alpha, rho = _alpha_rho(state)
        c, orders = _lag_weights(state), np.asarray(state.orders)
    train_t = np.arange(config.num_train_timesteps)
    knots = schedule.rho_at(config, train_t)
    t_of = lambda r: np.interp(np.log(r), np.log(knots), train_t)  # noqa: E731
    times = t_of(rho)
    for i in range(n):
        k, lo, hi = orders[i], rho[i + 1], rho[i]
        nodes = times[i - np.arange(k)]
        basis = lambda r, k=k, nodes=nodes: np.array([  # noqa: E731
            np.prod([(t_of(r) - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j]) for j in range(k)])
        inner = knots[(knots > lo) & (knots < hi)]
        integral, _ = integrate.quad_vec(basis, lo, hi, points=inner, limit=len(inner) + 200, epsabs=0, epsrel=1e-13)
        np.testing.assert_allclose(c[i, :k], -alpha[i + 1] * integral, rtol=1e-9, err_msg=f"step {i}")
        assert (c[i, k:] == 0).all()


def test_ipndm_weights_are_adams_bashforth():
    """iPNDM's weights are Delta rho times the Adams-Bashforth weights of order k: the integrals over
    [0, 1] of the Lagrange basis through the equally spaced nodes 0, -1, ..., -(k-1)."""
    rhos = np.array([5.0, 4.5, 3.0, 2.0, 1.2, 0.3])
    orders = np.array([1, 2, 3, 4, 4])
    expected = np.zeros((5, 4))
    for i, k in enumerate(orders):
        nodes = -np.arange(k, dtype=np.float64)
        for j in range(k):
            ell = np.polynomial.Polynomial([1.0])
            for m in np.delete(nodes, j):
                ell *= np.polynomial.Polynomial([-m, 1.0]) / (nodes[j] - m)
            antiderivative = ell.integ()
            expected[i, j] = (rhos[i + 1] - rhos[i]) * (antiderivative(1.0) - antiderivative(0.0))
    np.testing.assert_allclose(coefficients.ipndm_weights(rhos, orders, 4), expected, rtol=1e-12, atol=1e-15)


def test_rhoab_integrates_polynomials_in_rho_exactly():
    """rhoAB's weights integrate eps = q(rho) exactly over each step when deg q < k_i:
    sum_j c_{i,j} q(rho_{i-j}) = Q(rho_{i+1}) - Q(rho_i), Q' = q (closed form)."""
    rhos = np.array([8.0, 5.0, 3.2, 1.7, 0.9, 0.2])
    orders = np.array([1, 2, 3, 3, 3])
    q = np.polynomial.Polynomial([0.4, -1.3, 0.25])
    c = coefficients.rhoab_weights(rhos, orders, 3)
    for i, k in enumerate(orders):
        qk = np.polynomial.Polynomial(q.coef[:k])
        lags = np.arange(k)
        expected = qk.integ()(rhos[i + 1]) - qk.integ()(rhos[i])
        np.testing.assert_allclose(np.sum(c[i, :k] * qk(rhos[i - lags])), expected, rtol=1e-12)
        np.testing.assert_array_equal(c[i, k:], 0.0)


@pytest.mark.parametrize("name", ["logrho", "rhoab", "ipndm"])
def test_weight_formulas_trace_in_jax_numpy(name):
    """The host build uses numpy; the same functions with xp=jax.numpy run under jit (float64) to the
    same table, and jax.grad reaches the grid (what a learned grid needs)."""
    fn = coefficients.MULTISTEP_WEIGHTS[name]
    config = dj.DEISConfig(solver_order=3)
    with jax.enable_x64(True):
        state = dj.set_timesteps(config, 12, (1,), dtype=jnp.float64)
        _, rho = _alpha_rho(state)
        orders = np.asarray(state.orders)
        host = fn(rho, orders, 3)
        traced = jax.jit(lambda r: fn(r, orders, 3, xp=jnp))(jnp.asarray(rho))
        np.testing.assert_allclose(np.asarray(traced), host, rtol=1e-12, atol=1e-15)
        grad = jax.grad(lambda r: jnp.sum(fn(r, orders, 3, xp=jnp) ** 2))(jnp.asarray(rho))
        assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


@pytest.mark.parametrize("algorithm_type", ["deis", "data_prediction"])
def test_single_step_to_zero_is_the_denoised_estimate(algorithm_type):
    """N = 1 with final_sigmas_type="zero": one step from rho(t = 999) straight to x0 = (x - sigma eps) / alpha."""
    config = dj.DEISConfig(final_sigmas_type="zero", algorithm_type=algorithm_type)
    x, eps = np.array([0.3, -1.2, 2.0]), np.array([0.5, 0.1, -0.7])
    rho = np.float64(schedule.train_rhos(config)[-1])
    alpha = 1 / np.sqrt(1 + rho**2)
    out = dj.sample_from_noise(lambda x, t: jnp.asarray(eps, x.dtype), jnp.asarray(x, jnp.float32), config=config,
                               num_inference_steps=1)
    np.testing.assert_allclose(out, (x - rho * alpha * eps) / alpha, rtol=1e-5)
