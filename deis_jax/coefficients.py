"""Per-step DEIS update weights, decided once per (config, grid, begin_index).

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

With eta > 0 the steps solve the reverse SDE instead: the same polynomials, exact noise (`stochastic`).

The closed-form weight functions (logrho, rhoab, ipndm, rhork) take an array namespace `xp`:
`build` calls them with numpy in float64 for a static grid (the caller casts the finished table
once), and `build(..., xp=jax.numpy)` with a traced grid, one learned under `jax.grad`
(`deis_jax.learn`). tAB's quadrature (`tab_weights`) is host-only numpy.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from deis_jax import schedule, spacing
from deis_jax.config import RUNGE_KUTTA, DEISConfig

# lower_order_final only applies below this many steps (diffusers' rule).
LOWER_ORDER_FINAL_BELOW = 15
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
GAUSS_LEGENDRE_NODES = 16


def static_orders(config: DEISConfig, n: int, begin_index: int, stochastic: bool = False) -> np.ndarray:
    """k_i before looking at the grid's values: int array [N].

    k_i = min(solver_order, steps taken since begin_index + 1), lowered to 1 and 2 on the
    last two steps when `lower_order_final` and N < 15 (diffusers' rule), or at any N for the SDE
    (`stochastic`: extrapolating its noisy outputs over the widest, last steps diverges otherwise).
    """
    k = np.minimum(config.solver_order, np.maximum(np.arange(n) - begin_index, 0) + 1)
    if config.lower_order_final and (n < LOWER_ORDER_FINAL_BELOW or stochastic):
        k[-1] = 1
        k[-2:] = np.minimum(k[-2:], 2)
    return k


def effective_orders(config: DEISConfig, sigmas: np.ndarray, begin_index: int, stochastic: bool = False) -> np.ndarray:
    """k_i, the number of past outputs step i uses: int array [N].

    `static_orders`, lowered further so that the interpolation nodes sigma_i, sigma_{i-1}, ... are
    finite and distinct (repeated sigmas would make the Lagrange basis divide by zero; sigma = inf
    is a zero-SNR start, which iPNDM's fixed weights can keep, and rhoAB's data form, a polynomial in
    kappa = 1/rho = 0 there).
    """
    n = len(sigmas) - 1
    k = static_orders(config, n, begin_index, stochastic)
    keeps_inf = config.solver_type == "ipndm" or (config.solver_type == "rhoab" and config.predicts_data)
    for i in range(n):
        for j in range(1, k[i]):
            at_infinity = not np.isfinite(sigmas[i - j]) and not keeps_inf
            if at_infinity or np.any(sigmas[i - j] == sigmas[i - j + 1 : i + 1]):
                k[i] = j
                break
    return k


def _basis_per_step(coord, orders: np.ndarray, max_order: int, xp: ModuleType):
    """Lagrange basis [N, K, K] in v = coord - coord_i through coord_i, coord_{i-1}, ... (k_i of them).

    Entry [i, j, p] is the coefficient of v^p in ell_j(v) = prod_{m != j} (v - v_m) / (v_j - v_m),
    v_m = coord_{i-m} - coord_i; rows of inactive lags (j >= k_i) are zero.
    """
    n = coord.shape[0] - 1
    lag = np.arange(max_order)
    idx = np.arange(n)[:, None] - lag[None, :]  # node of lag j at step i: i - j
    active = (lag[None, :] < orders[:, None]) & (idx >= 0)
    nodes = xp.where(active, coord[np.maximum(idx, 0)] - coord[:n, None], 0.0)  # [N, K]
    basis = xp.where(active[:, :, None], (lag[None, None, :] == 0) * 1.0, 0.0).astype(nodes.dtype)  # [N, j, p]
    for m in range(max_order):
        use = active & active[:, m, None] & (lag[None, :] != m)  # [N, j]: ell_j gets node m's factor
        denom = xp.where(use, nodes - nodes[:, m, None], 1.0)
        const = xp.where(use, -nodes[:, m, None] / denom, 1.0)[..., None]
        lin = xp.where(use, 1.0 / denom, 0.0)[..., None]
        shifted = xp.concatenate([xp.zeros_like(basis[..., :1]), basis[..., :-1]], axis=-1)
        basis = const * basis + lin * shifted
    return basis


def _polyval(poly, v, xp: ModuleType):
    """Evaluate ascending-power polynomials [..., K] at v."""
    return xp.sum(poly * v ** np.arange(poly.shape[-1]), axis=-1)


def _exp_integral_operator(num_nodes: int, rate: float = 1.0) -> np.ndarray:
    """Matrix D with (p @ D) = coefficients of Q = sum_m (-1)^m p^(m) / rate^(m+1) (so d/dv[e^(rate v) Q(v)] =
    e^(rate v) p(v)); rate = 1: Q = p - p' + p'' - ..."""
    deriv = np.diag(np.arange(1, num_nodes, dtype=np.float64), 1).T  # p' = p @ deriv
    op = np.zeros((num_nodes, num_nodes))
    term = np.eye(num_nodes) / rate
    for m in range(num_nodes):
        op += (-1) ** m * term
        term = term @ deriv / rate
    return op


def logrho_weights(rhos, orders: np.ndarray, max_order: int, xp: ModuleType = np, power: float = 0.0):
    """Integrals of ell_j(log r) r^power dr over [r_i, r_{i+1}], closed form: [N, max_order].

    With v = log r - log r_i and c = 1 + power: r_i^c [e^(c h) Q_c(h) - Q_c(0)] (`_exp_integral_operator`).
    power = 0 is the ODE's integral; the stochastic data form has power = eta^2 (`build`).
    """
    n = rhos.shape[0] - 1
    rate = 1.0 + power
    log_rho = xp.log(rhos)
    h = (log_rho[1:] - log_rho[:-1])[:, None]
    q = _basis_per_step(log_rho, orders, max_order, xp) @ _exp_integral_operator(max_order, rate)
    # r_i^c [e^(c h) Q(h) - Q(0)] = r_i^c [(e^(c h) - 1) Q(h) + Q(h) - Q(0)]
    q_h = _polyval(q, h[..., None], xp)
    scale = rhos[:n, None] if rate == 1.0 else rhos[:n, None] ** rate
    return scale * (xp.expm1(rate * h) * q_h + q_h - q[..., 0])


def rhoab_weights(rhos, orders: np.ndarray, max_order: int, xp: ModuleType = np):
    """Integrals of ell_j(rho) over [rho_i, rho_{i+1}]: sum_m p_m Delta^(m+1) / (m+1)."""
    delta = (rhos[1:] - rhos[:-1])[:, None, None]
    p = _basis_per_step(rhos, orders, max_order, xp)
    m = np.arange(max_order)
    return xp.sum(p * delta ** (m + 1) / (m + 1), axis=-1)


def ipndm_weights(rhos, orders: np.ndarray, max_order: int, xp: ModuleType = np):
    """(rho_{i+1} - rho_i) times the Adams-Bashforth weights of order k_i."""
    table = np.zeros((len(ADAMS_BASHFORTH) + 1, max(ADAMS_BASHFORTH)))
    for k, weights in ADAMS_BASHFORTH.items():
        table[k, :k] = weights
    return (rhos[1:] - rhos[:-1])[:, None] * table[:, :max_order][orders]


def _quadrature_points(config: DEISConfig, log_rho: np.ndarray):
    """Gauss-Legendre points (step, u, weight) covering each step's [u_i, u_{i+1}], u = log rho.

    Discrete VP schedules are split at every training timestep's log rho, where t(u) has a kink,
    so each piece's integrand ell(t(u)) e^u is smooth; other schedules are split in two equal pieces.
    The sign of each piece's weight orients it from u_i to u_{i+1}.
    """
    x, w = np.polynomial.legendre.leggauss(GAUSS_LEGENDRE_NODES)
    knots = None
    if not config.is_continuous and not config.use_flow_sigmas:
        knots = schedule.log_train_rhos(config)
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


def tab_weights(config: DEISConfig, kappas: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Integrals of ell_j(t) over [kappa_i, kappa_{i+1}] = int ell_j(t(u)) (d kappa / du) du, u = log rho, by
    Gauss-Legendre (float64 numpy; the nodes t_i are the model times of the grid). kappa = rho: d kappa / du
    = e^u; in the data form kappa = 1 / rho: -e^-u."""
    log_rho = np.log(schedule.integration_variable(config, kappas))
    times = spacing.model_time(config, log_rho)
    step, u, weight = _quadrature_points(config, log_rho)
    p = _basis_per_step(times, orders, config.solver_order, np)
    v = spacing.model_time(config, u) - times[step]
    jacobian = -np.exp(-u) if config.predicts_data else np.exp(u)
    integrand = _polyval(p[step], v[:, None, None], np) * (weight * jacobian)[:, None]
    out = np.zeros((len(orders), config.solver_order))
    np.add.at(out, step, integrand)
    return out


def runge_kutta_weights(step_rhos, order: int, xp: ModuleType = np):
    """Lag weights [N S, S] of rhoRK: evaluation e = i S + s maps the sample at stage s to the next point,
    y_next = x / alpha_e + Delta_i sum_r (A_next,r - A_s,r) k_r with y = x / alpha, A_next = b after the
    last stage, Delta_i = rho_{i+1} - rho_i; lag j holds stage r = s - j."""
    _, a_mat, b = (np.asarray(v, np.float64) for v in RUNGE_KUTTA[order])
    rows = np.vstack([a_mat, b[None, :]])
    by_stage = rows[1:] - rows[:-1]  # [S, S]: weight of k_r when leaving stage s
    s_idx = np.arange(order)
    lags = s_idx[:, None] - s_idx[None, :]
    by_lag = np.where(lags >= 0, np.take_along_axis(by_stage, np.maximum(lags, 0), axis=1), 0.0)
    delta = step_rhos[1:] - step_rhos[:-1]
    return (delta[:, None, None] * by_lag[None]).reshape(-1, order)


MULTISTEP_WEIGHTS = {"logrho": logrho_weights, "rhoab": rhoab_weights, "ipndm": ipndm_weights}


def build(config: DEISConfig, grid: spacing.Grid, begin_index: int, xp: ModuleType = np, eta: float = 0.0) -> dict:
    """Per evaluation e: orders (numpy int), alpha_t, sigma_t, a, b, lag weights c [E, K] and the noise std.

    x_{e+1} = a_e x_e + b_e x0_e + sum_j c_{e,j} m_{e-j} + noise_e z_e, with m = eps (noise form) or x0 (data
    form); in the data form kappa = 1 / rho and the scale is sigma: a = sigma_{e+1} / sigma_e, c = sigma_{e+1} *
    integral of ell_j d kappa. Two steps are limits, closed form for every solver: from rho = inf (zero
    terminal SNR), x' = alpha' x0 + sigma' eps (eps = x there); to sigma = 0, x' = x0 (b = 1).

    eta > 0 (`stochastic`): the reverse SDE with noise scale eta instead of the ODE.

    xp=numpy: a static grid, in float64. xp=jax.numpy: a grid of (possibly traced) jnp arrays, e.g. one
    being learned under `jax.grad`; its values then decide nothing: the orders are `static_orders` (the
    sigmas must be finite and distinct), the grid ends at 0 exactly when final_sigmas_type="zero", and
    solver_type="tab" (host quadrature) raises ValueError.
    """
    traced = xp is not np
    if traced and config.solver_type == "tab":
        raise ValueError("solver_type='tab' is invalid for a traced grid: its weights are a host-side quadrature "
                         "(use 'logrho', 'rhoab', 'ipndm' or 'rhork').")
    alpha, sigma = schedule.alpha_sigma(config, grid.sigmas, xp=xp)
    rhos = schedule.rho_from_sigma(config, grid.step_sigmas)
    to_zero = config.final_sigmas_type == "zero" if traced else bool(rhos[-1] == 0)
    kappa = schedule.integration_variable(config, rhos[: len(rhos) - to_zero])  # the steps of the integral
    if len(kappa) == 1:  # a single step, to sigma = 0
        orders, integrals = np.ones(1, np.int64), xp.zeros((0, config.solver_order))
    elif config.solver_type == "rhork":
        orders = np.full(len(grid.timesteps), config.solver_order)
        integrals = runge_kutta_weights(kappa, config.solver_order, xp)
    else:
        orders = (static_orders(config, len(grid.timesteps), begin_index, bool(eta)) if traced
                  else effective_orders(config, np.asarray(grid.sigmas), begin_index, bool(eta)))
        if config.solver_type == "tab":
            integrals = tab_weights(config, kappa, orders[: len(kappa) - 1])
        else:
            extra = {"power": eta**2} if eta and config.predicts_data else {}  # the data form's SDE kernel
            with np.errstate(invalid="ignore", divide="ignore"):  # a node at rho = inf (zero SNR): replaced below
                integrals = MULTISTEP_WEIGHTS[config.solver_type](kappa, orders[: len(kappa) - 1], config.solver_order,
                                                                  xp, **extra)
    if to_zero:
        orders[-1] = 1
        integrals = xp.concatenate([integrals, xp.zeros((1, config.solver_order), integrals.dtype)])
    scale = sigma if config.predicts_data else alpha
    from_inf = xp.isinf(grid.sigmas[:-1])
    last = np.arange(len(orders)) == len(orders) - 1
    ends = to_zero & last
    first_lag = np.arange(integrals.shape[1]) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        a = xp.where(ends, 0.0, scale[1:] / scale[:-1])
        c = scale[1:, None] * integrals
    noise = xp.zeros_like(a)
    if eta:
        a, c, noise = stochastic(config, eta, schedule.integration_variable(config, rhos), alpha, sigma, a, c, xp)
    if config.predicts_data:  # from rho = inf: a = sigma' (eps = x), the x0 weight alpha'
        c = xp.where(from_inf[:, None], first_lag * alpha[1:, None], c)
        b = xp.where(ends, 1.0, 0.0)
    else:  # from rho = inf: a = 0, x0 weight alpha', eps weight sigma' (none for the SDE: fresh noise instead)
        a = xp.where(from_inf, 0.0, a)
        c = xp.where(from_inf[:, None], first_lag * sigma[1:, None] * (not eta), c)
        b = xp.where(from_inf | ends, alpha[1:], 0.0)
        noise = xp.where(from_inf, sigma[1:] * bool(eta), noise)
    c = xp.where(ends[:, None], 0.0, c)
    noise = xp.where(ends, 0.0, noise)
    return dict(orders=orders, alpha_t=alpha[:-1], sigma_t=sigma[:-1], a=a, b=b, c=c, noise=noise)


def stochastic(config: DEISConfig, eta: float, kappa, alpha, sigma, a, c, xp: ModuleType = np):
    """(a, c, noise std) of the reverse SDE with noise scale eta, from the ODE's a and c.

    In y = x / alpha the SDE dx = [f x - (1 + eta^2) g^2 score / 2] dt + eta g dW is
    dy = (1 + eta^2) eps d rho + eta sqrt(-d rho^2) dW (eta = 0: the probability-flow ODE). Over a step, exact in
    the linear part and with the ODE's polynomial for eps or x0:
      noise form: c *= 1 + eta^2; noise std alpha' eta sqrt(rho^2 - rho'^2).
      data form (kappa = 1 / rho, h = log(kappa' / kappa)): a *= e^(-eta^2 h); c = (1 + eta^2) sigma'
        kappa'^(-eta^2) * integral of ell_j kappa^(eta^2) d kappa (`logrho_weights(power=eta^2)`, already in c);
        noise std sigma' sqrt(1 - e^(-2 eta^2 h)).
    At eta = 1 and order 1 these are DPM-Solver's sde-dpmsolver and sde-dpmsolver++ (DDPM) steps.
    """
    eta2, rate = eta**2, 1.0 + eta**2
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if not config.predicts_data:
            return a, rate * c, alpha[1:] * eta * xp.sqrt((kappa[:-1] - kappa[1:]) * (kappa[:-1] + kappa[1:]))
        minus_h = xp.log(kappa[:-1] / kappa[1:])  # -inf from rho = inf (kappa = 0)
        return (a * xp.exp(eta2 * minus_h), rate * kappa[1:, None] ** -eta2 * c,
                sigma[1:] * xp.sqrt(-xp.expm1(2.0 * eta2 * minus_h)))
