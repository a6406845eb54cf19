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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax import schedule
from deis_jax.config import DEISConfig

# lower_order_final only applies below this many steps (diffusers' rule).
LOWER_ORDER_FINAL_BELOW = 15


def effective_orders(config: DEISConfig, sigmas: np.ndarray, begin_index: int) -> np.ndarray:
    """k_i, the number of past outputs step i uses: int array [N].

    k_i = min(solver_order, steps taken since begin_index + 1), lowered to 1 and 2 on the
    last two steps when `lower_order_final` and N < 15, and lowered further so that the
    interpolation nodes sigma_i, sigma_{i-1}, ... are distinct (repeated sigmas would make
    the Lagrange basis divide by zero).
    """
    n = len(sigmas) - 1
    k = np.minimum(config.solver_order, np.maximum(np.arange(n) - begin_index, 0) + 1)
    if config.lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
        k[-1] = 1
        k[-2:] = np.minimum(k[-2:], 2)
    for i in range(n):
        for j in range(1, k[i]):
            if np.any(sigmas[i - j] == sigmas[i - j + 1 : i + 1]):
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


def logrho_weights(rhos: jnp.ndarray, orders: np.ndarray, max_order: int) -> jnp.ndarray:
    """c_{i,j} / alpha_{i+1}: integrals of ell_j(log rho) over [rho_i, rho_{i+1}], shape [N, max_order]."""
    n = rhos.shape[0] - 1
    log_rho = jnp.log(rhos)
    lag = np.arange(max_order)
    idx = np.arange(n)[:, None] - lag[None, :]  # node of lag j at step i: i - j
    active = (lag[None, :] < orders[:, None]) & (idx >= 0)
    nodes = jnp.where(active, log_rho[np.maximum(idx, 0)] - log_rho[:n, None], 0.0)
    h = (log_rho[1:] - log_rho[:-1])[:, None]
    q = jax.vmap(lagrange_basis)(nodes, jnp.asarray(active)) @ _exp_integral_operator(max_order, rhos.dtype)
    # rho_i [e^h Q(h) - Q(0)] = rho_i [(e^h - 1) Q(h) + Q(h) - Q(0)]
    q_h = _polyval(q, h[..., None])
    return rhos[:n, None] * (jnp.expm1(h) * q_h + q_h - q[..., 0])


def step_tables(config: DEISConfig, sigmas: np.ndarray, begin_index: int, dtype) -> dict[str, jnp.ndarray]:
    """Everything a step needs, per step i: alpha_i, sigma_i, a_i and lag weights c_{i,j} [N, order]."""
    alpha, sigma = schedule.alpha_sigma(config, jnp.asarray(sigmas, dtype))
    rhos = sigma / alpha
    orders = effective_orders(config, sigmas, begin_index)
    c = alpha[1:, None] * logrho_weights(rhos, orders, config.solver_order)
    return {"alpha_t": alpha[:-1], "sigma_t": sigma[:-1], "a": alpha[1:] / alpha[:-1], "c": c, "orders": orders}
