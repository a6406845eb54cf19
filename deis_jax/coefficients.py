"""Per-step DEIS update weights, decided once per (config, step count).

The probability-flow ODE in rho = sigma/alpha is d(x / alpha)/d rho = eps(x, rho),
so over step i (rho_i -> rho_{i+1})

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} * integral_{rho_i}^{rho_{i+1}} eps d rho.

DEIS replaces eps by the Lagrange polynomial through the last k_i converted
outputs eps_i, eps_{i-1}, ..., so the update is linear in them:

    x_{i+1} = a_i x_i + sum_{j < k_i} c_{i,j} eps_{i-j},
    a_i = alpha_{i+1} / alpha_i,   c_{i,j} = alpha_{i+1} * integral ell_j(log rho) d rho.

For log-rho DEIS, with v = log rho - log rho_i and h = v at rho_{i+1}, the integral of
ell_j(v) e^v is closed form: rho_i [e^h Q_j(h) - Q_j(0)], Q_j = sum_m (-1)^m ell_j^(m).
With k_i = 1 it is DDIM: c = alpha_{i+1} (rho_{i+1} - rho_i).

The other variants of the paper change only the integral (the weights):
  tab    ell_j in the time t; integral of ell_j(t(rho)) d rho by Gauss-Legendre quadrature in log rho;
  rhoab  ell_j in rho; integral of a polynomial, closed form;
  ipndm  DDIM weight times fixed Adams-Bashforth weights (55, -59, 37, -9)/24 and lower orders;
  rhork  Runge-Kutta in rho: several evaluations per step, each a row of the same tables.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax import schedule, spacing
from deis_jax.config import DEISConfig

# lower_order_final only applies below this many steps (diffusers' rule).
LOWER_ORDER_FINAL_BELOW = 15
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
# Explicit Runge-Kutta tableaus (c, A, b): Euler, Heun, Kutta's third order, classic RK4.
RUNGE_KUTTA = {
    1: ((0.0,), ((0.0,),), (1.0,)),
    2: ((0.0, 1.0), ((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5)),
    3: ((0.0, 0.5, 1.0), ((0, 0, 0), (0.5, 0, 0), (-1.0, 2.0, 0)), (1 / 6, 4 / 6, 1 / 6)),
    4: ((0.0, 0.5, 0.5, 1.0), ((0, 0, 0, 0), (0.5, 0, 0, 0), (0, 0.5, 0, 0), (0, 0, 1.0, 0)),
        (1 / 6, 2 / 6, 2 / 6, 1 / 6)),
}
GAUSS_LEGENDRE_NODES = 16


def effective_orders(config: DEISConfig, sigmas: np.ndarray, begin_index: int) -> np.ndarray:
    """k_i, the number of past outputs step i uses: int array [N].

    k_i = min(solver_order, steps taken since begin_index + 1), lowered to 1 and 2 on the
    last two steps when `lower_order_final` and N < 15, and lowered further so that the
    interpolation nodes sigma_i, sigma_{i-1}, ... are finite and distinct (repeated sigmas would
    make the Lagrange basis divide by zero; sigma = inf is a zero-SNR start, which iPNDM's fixed
    weights can keep).
    """
    n = len(sigmas) - 1
    k = np.minimum(config.solver_order, np.maximum(np.arange(n) - begin_index, 0) + 1)
    if config.lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
        k[-1] = 1
        k[-2:] = np.minimum(k[-2:], 2)
    for i in range(n):
        for j in range(1, k[i]):
            at_infinity = not np.isfinite(sigmas[i - j]) and config.solver_type != "ipndm"
            if at_infinity or np.any(sigmas[i - j] == sigmas[i - j + 1 : i + 1]):
                k[i] = j
                break
    return k


def lagrange_basis(nodes: jnp.ndarray, active: jnp.ndarray) -> jnp.ndarray:
    """Ascending power coefficients [K, K] of the Lagrange basis ell_j through the active nodes.

    ell_j(v) = prod_{m != j, m active} (v - v_m) / (v_j - v_m); inactive rows are zero.
    """
    num_nodes = nodes.shape[0]
    basis = []
    for j in range(num_nodes):
        poly = jnp.zeros(num_nodes, nodes.dtype).at[0].set(1.0)
        for m in range(num_nodes):
            if m == j:
                continue
            denom = jnp.where(active[m], nodes[j] - nodes[m], 1.0)
            factor_const = jnp.where(active[m], -nodes[m] / denom, 1.0)
            factor_lin = jnp.where(active[m], 1.0 / denom, 0.0)
            poly = factor_const * poly + factor_lin * jnp.concatenate([jnp.zeros(1, poly.dtype), poly[:-1]])
        basis.append(jnp.where(active[j], poly, 0.0))
    return jnp.stack(basis)


def _polyval(poly: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """Evaluate ascending-power polynomials [..., K] at v."""
    powers = v ** jnp.arange(poly.shape[-1], dtype=poly.dtype)
    return jnp.sum(poly * powers, axis=-1)


def _exp_integral_operator(num_nodes: int, dtype) -> jnp.ndarray:
    """Matrix D with (p @ D) = coefficients of Q = p - p' + p'' - ... (so d/dv[e^v Q(v)] = e^v p(v))."""
    deriv = np.diag(np.arange(1, num_nodes, dtype=np.float64), 1).T  # p' = p @ deriv
    op = np.zeros((num_nodes, num_nodes))
    term = np.eye(num_nodes)
    for m in range(num_nodes):
        op += (-1) ** m * term
        term = term @ deriv
    return jnp.asarray(op, dtype)


def _basis_per_step(coord: jnp.ndarray, orders: jnp.ndarray, max_order: int) -> jnp.ndarray:
    """Lagrange basis [N, K, K] in v = coord - coord_i through coord_i, coord_{i-1}, ... (k_i of them)."""
    n = coord.shape[0] - 1
    lag = np.arange(max_order)
    idx = np.arange(n)[:, None] - lag[None, :]  # node of lag j at step i: i - j
    active = (lag[None, :] < orders[:, None]) & (idx >= 0)
    nodes = jnp.where(active, coord[np.maximum(idx, 0)] - coord[:n, None], 0.0)
    return jax.vmap(lagrange_basis)(nodes, jnp.asarray(active))


def logrho_weights(rhos: jnp.ndarray, orders: jnp.ndarray, max_order: int) -> jnp.ndarray:
    """Integrals of ell_j(log rho) over [rho_i, rho_{i+1}], closed form: [N, max_order]."""
    n = rhos.shape[0] - 1
    log_rho = jnp.log(rhos)
    h = (log_rho[1:] - log_rho[:-1])[:, None]
    q = _basis_per_step(log_rho, orders, max_order) @ _exp_integral_operator(max_order, rhos.dtype)
    # rho_i [e^h Q(h) - Q(0)] = rho_i [(e^h - 1) Q(h) + Q(h) - Q(0)]
    q_h = _polyval(q, h[..., None])
    return rhos[:n, None] * (jnp.expm1(h) * q_h + q_h - q[..., 0])


def rhoab_weights(rhos: jnp.ndarray, orders: jnp.ndarray, max_order: int) -> jnp.ndarray:
    """Integrals of ell_j(rho) over [rho_i, rho_{i+1}]: sum_m p_m Delta^(m+1) / (m+1)."""
    delta = (rhos[1:] - rhos[:-1])[:, None, None]
    p = _basis_per_step(rhos, orders, max_order)
    m = jnp.arange(max_order, dtype=rhos.dtype)
    return jnp.sum(p * delta ** (m + 1) / (m + 1), axis=-1)


def ipndm_weights(rhos: jnp.ndarray, orders: jnp.ndarray, max_order: int) -> jnp.ndarray:
    """(rho_{i+1} - rho_i) times the Adams-Bashforth weights of order k_i."""
    table = np.zeros((len(ADAMS_BASHFORTH) + 1, max(ADAMS_BASHFORTH)))
    for k, weights in ADAMS_BASHFORTH.items():
        table[k, :k] = weights
    return (rhos[1:] - rhos[:-1])[:, None] * jnp.asarray(table[:, :max_order], rhos.dtype)[orders]


def time_of_log_rho(config: DEISConfig, u: np.ndarray) -> np.ndarray:
    """The model time t as a function of u = log rho (float64): analytic for continuous and flow
    schedules, piecewise linear between training timesteps for discrete ones."""
    if config.is_continuous:
        return schedule.continuous_t(config, np.exp(u))
    if config.use_flow_sigmas:
        return config.num_train_timesteps / (1.0 + np.exp(-u))  # s * N, s = rho / (1 + rho)
    return spacing.sigma_to_t(np.exp(u), np.log(schedule.train_rhos(config)).astype(np.float64))


def _quadrature_points(config: DEISConfig, log_rho: np.ndarray):
    """Gauss-Legendre points (step, u, weight) covering each step's [u_i, u_{i+1}].

    Discrete VP schedules are split at every training timestep, where t(u) has a kink, so each
    piece's integrand ell(t(u)) e^u is smooth; other schedules are split in two equal pieces.
    """
    x, w = np.polynomial.legendre.leggauss(GAUSS_LEGENDRE_NODES)
    knots = None
    if not config.is_continuous and not config.use_flow_sigmas:
        knots = np.log(schedule.train_rhos(config)).astype(np.float64)
    steps, los, his = [], [], []
    for i in range(len(log_rho) - 1):
        lo, hi = sorted((log_rho[i], log_rho[i + 1]))
        inner = knots[(knots > lo) & (knots < hi)] if knots is not None else np.array([0.5 * (lo + hi)])
        edges = np.concatenate([[lo], inner, [hi]])
        sign = 1.0 if log_rho[i + 1] >= log_rho[i] else -1.0
        steps += [i] * (len(edges) - 1)
        los.append(edges[:-1])
        his.append(sign * (edges[1:] - edges[:-1]))  # signed length: integrate from u_i to u_{i+1}
    lo, length = np.concatenate(los), np.concatenate(his)
    width = np.abs(length)
    u = lo[:, None] + 0.5 * width[:, None] * (x[None, :] + 1.0)
    weight = 0.5 * length[:, None] * w[None, :]
    return np.repeat(np.asarray(steps), len(x)), u.ravel(), weight.ravel()


def tab_quadrature(config: DEISConfig, rhos: np.ndarray) -> dict[str, np.ndarray]:
    """Host-side quadrature data for tAB: node times t_i, and per point its step, t - t_step and
    weight * e^u (float64)."""
    log_rho = np.log(rhos)
    times = time_of_log_rho(config, log_rho)
    step, u, weight = _quadrature_points(config, log_rho)
    return dict(times=times, step=step, v=time_of_log_rho(config, u) - times[step], weight=weight * np.exp(u))


def tab_weights(quad: dict[str, jnp.ndarray], orders: jnp.ndarray, max_order: int) -> jnp.ndarray:
    """Integrals of ell_j(t) over [rho_i, rho_{i+1}] = int ell_j(t(u)) e^u du, by Gauss-Legendre."""
    p = _basis_per_step(quad["times"], orders, max_order)
    integrand = _polyval(p[quad["step"]], quad["v"][:, None, None]) * quad["weight"][:, None]
    return jax.ops.segment_sum(integrand, quad["step"], num_segments=orders.shape[0])


MULTISTEP_WEIGHTS = {"logrho": logrho_weights, "rhoab": rhoab_weights, "ipndm": ipndm_weights}


def _runge_kutta_grid(config: DEISConfig, sigmas: np.ndarray):
    """Evaluation points of rhoRK: for step i, rho_i + c_s (rho_{i+1} - rho_i), s < S.

    Returns (timesteps [N S], sigmas [N S + 1], weights by lag [N S, S]) where
    evaluation e = i S + s maps the sample at its point to the sample at the next point:
    y_next = x / alpha_e + Delta_i sum_r (A_next,r - A_s,r) k_r with y = x / alpha and
    A_next = b after the last stage.
    """
    c, a_mat, b = (np.asarray(v, np.float64) for v in RUNGE_KUTTA[config.solver_order])
    stages = len(c)
    rho = schedule.rho_from_sigma(config, sigmas)
    delta = rho[1:] - rho[:-1]
    stage_rho = (rho[:-1, None] + c[None, :] * delta[:, None]).ravel()
    rows = np.vstack([a_mat, b[None, :]])
    by_stage = rows[1:] - rows[:-1]  # [S, S]: weight of k_r when leaving stage s
    weights = (delta[:, None, None] * by_stage[None]).reshape(-1, stages)
    s_idx = np.tile(np.arange(stages), len(delta))
    lags = s_idx[:, None] - np.arange(stages)[None, :]  # lag j holds stage r = s - j
    lag_weights = np.where(lags >= 0, np.take_along_axis(weights, np.maximum(lags, 0), axis=1), 0.0)
    timesteps = time_of_log_rho(config, np.log(stage_rho))
    return timesteps, schedule.sigma_from_rho(config, np.append(stage_rho, rho[-1])), lag_weights


@functools.partial(jax.jit, static_argnames="config")
def _device_tables(config: DEISConfig, sigmas: jnp.ndarray, orders: jnp.ndarray, extra):
    """The jnp part of `build`, compiled once per (config, step count)."""
    alpha, sigma = schedule.alpha_sigma(config, sigmas)
    if config.solver_type == "rhork":
        integrals = extra
    elif config.solver_type == "tab":
        integrals = tab_weights(extra, orders, config.solver_order)
    else:
        integrals = MULTISTEP_WEIGHTS[config.solver_type](sigma / alpha, orders, config.solver_order)
    # A step from rho = inf (zero SNR, alpha = 0) is the limit of DDIM: x' = alpha' x0 + sigma' eps.
    from_inf = jnp.isinf(sigmas[:-1])
    first_lag = jnp.arange(integrals.shape[1]) == 0
    return dict(
        alpha_t=alpha[:-1], sigma_t=sigma[:-1],
        a=jnp.where(from_inf, 0.0, alpha[1:] / alpha[:-1]),
        b=jnp.where(from_inf, alpha[1:], 0.0),
        c=jnp.where(from_inf[:, None], first_lag * sigma[1:, None], alpha[1:, None] * integrals),
    )


def build(config: DEISConfig, timesteps: np.ndarray, sigmas: np.ndarray, begin_index: int, dtype):
    """Per evaluation e: timesteps, sigmas [E + 1], orders, alpha_t, sigma_t, a, b and lag weights c [E, K].

    x_{e+1} = a_e x_e + b_e x0_e + sum_j c_{e,j} eps_{e-j}; b is nonzero only on a step from rho = inf.

    Grids, orders and quadrature points are placed on the host (float64); the weights are
    computed in jnp, in `dtype`.
    """
    sigmas = np.asarray(sigmas, np.float64)
    extra = None
    if config.solver_type == "rhork":
        timesteps, sigmas, extra = _runge_kutta_grid(config, sigmas)
        orders = np.full(len(timesteps), config.solver_order)
    else:
        orders = effective_orders(config, sigmas, begin_index)
        if config.solver_type == "tab":
            extra = tab_quadrature(config, schedule.rho_from_sigma(config, sigmas))
    args = jax.tree_util.tree_map(
        lambda v: np.asarray(v, np.int32 if v.dtype.kind == "i" else dtype),
        (sigmas, orders, extra))
    # Compiled ahead of time and called directly: it runs now, even while a caller's jit is tracing.
    tables = _device_tables.lower(config, *args).compile()(*args)
    return dict(timesteps=timesteps, sigmas=sigmas, orders=orders, **{k: np.asarray(v) for k, v in tables.items()})
