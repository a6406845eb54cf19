"""Where the model is evaluated: the inference timesteps and their sigmas.

`timesteps_and_sigmas` returns diffusers' `scheduler.timesteps` and
`scheduler.sigmas` (rho for VP schedules, with one extra final entry).
Host-side numpy: the step count is static, so these are constants of the loop.
"""

from __future__ import annotations

import math

import numpy as np

from deis_jax import schedule
from deis_jax.config import DEISConfig

KARRAS_RHO = 7.0  # Karras et al. (2022): sigmas uniform in sigma^(1/7)
BETA_SIGMAS_AB = 0.6  # Lee et al., "Beta Sampling is All You Need": Beta(0.6, 0.6) quantiles


def max_inference_steps(config: DEISConfig) -> int:
    """The largest step count accepted: one whose discrete timesteps are all distinct (10,000 for
    continuous time). diffusers' own sigma grids (flow, or Karras/exponential/beta for logrho) may
    repeat timesteps, and accept up to num_train_timesteps steps, as diffusers does."""
    if config.is_continuous:
        return 10_000
    n = config.num_train_timesteps
    if config.use_flow_sigmas or (config.solver_type == "logrho" and config.uses_sigma_grid):
        return n
    return n if config.timestep_spacing == "trailing" else n - 1


def _spaced_timesteps(config: DEISConfig, num_inference_steps: int) -> np.ndarray:
    n_train, n = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n_train // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    ratio = n_train / n  # trailing
    return np.arange(n_train, 0, -ratio).round().astype(np.int64) - 1


def sigma_to_t(sigma: np.ndarray, log_train_rhos: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose rho equals sigma: linear interpolation in log rho, clamped."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    low = np.clip(np.searchsorted(log_train_rhos, log_sigma, side="right") - 1, 0, len(log_train_rhos) - 2)
    lo, hi = log_train_rhos[low], log_train_rhos[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * f / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution, by bisection on I_x(a, b) (to float64 precision)."""
    lo, hi = 0.0, 1.0
    if q <= 0 or q >= 1:
        return float(q >= 1)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _betainc(a, b, mid) < q else (lo, mid)
    return 0.5 * (lo + hi)


def _sigma_schedule(config: DEISConfig, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    if config.use_karras_sigmas:
        inv_min, inv_max = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
        return (inv_max + ramp * (inv_min - inv_max)) ** KARRAS_RHO
    if config.use_exponential_sigmas:
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
    ppf = np.array([beta_ppf(q, BETA_SIGMAS_AB, BETA_SIGMAS_AB) for q in 1 - ramp])
    return sigma_min + ppf * (sigma_max - sigma_min)


def _strictly_decreasing(t: np.ndarray, top: int) -> np.ndarray:
    """Integer timesteps in [0, top], strictly decreasing, moved as little as rounding allows."""
    t = np.clip(t, 0, top)
    for j in range(len(t) - 2, -1, -1):  # from the low end up
        t[j] = max(t[j], t[j + 1] + 1)
    t[0] = min(t[0], top)
    for j in range(1, len(t)):  # and back down from the top
        t[j] = min(t[j], t[j - 1] - 1)
    return t


def _consistent_discrete_grid(t_grid: np.ndarray, rhos: np.ndarray):
    """N + 1 rounded, strictly decreasing timesteps ending at 0 and their exact training rhos.

    The model is evaluated at the first N; each sigma is the noise level the model is trained
    for at its timestep.
    """
    t = _strictly_decreasing(np.round(t_grid).astype(np.int64), len(rhos) - 1)
    return t[:-1], rhos[t].astype(np.float64)


def _continuous_grid(config: DEISConfig, n: int):
    """N + 1 float times from t_max to t_min (uniform in t, in sqrt(t), or from a rho grid)."""
    t_lo, t_hi = config.t_min, config.t_max
    if config.uses_sigma_grid:
        rho_lo, rho_hi = schedule.continuous_rho(config, np.array([t_lo, t_hi]))
        t = schedule.continuous_t(config, _sigma_schedule(config, rho_lo, rho_hi, n + 1))
        t[0], t[-1] = t_hi, t_lo
    elif config.timestep_spacing == "quadratic":
        t = np.linspace(t_hi**0.5, t_lo**0.5, n + 1) ** 2
    else:  # linspace, leading and trailing only differ in rounding to integers: uniform in t
        t = np.linspace(t_hi, t_lo, n + 1)
    return t[:-1], schedule.continuous_rho(config, t)


def timesteps_and_sigmas(
    config: DEISConfig, num_inference_steps: int, mu: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [N], sigmas float64 [N + 1]) of the step grid.

    For solver_type="logrho" on a discrete schedule these are exactly diffusers' `timesteps` and
    `sigmas` (with `use_dynamic_shifting`, `mu` sets the flow shift to exp(mu) for this call).
    The other solvers use the same grids, except that a sigma grid (Karras, exponential, beta)
    is rounded to N + 1 distinct timesteps ending at t = 0 whose sigmas are the training ones,
    so that the model's timestep and the solver's sigma always agree. Continuous schedules give
    float timesteps.
    """
    n = num_inference_steps
    if config.is_continuous:
        return _continuous_grid(config, n)
    if config.use_flow_sigmas:
        shift = config.flow_shift if mu is None else math.exp(mu)
        s = 1.0 - np.linspace(1, 1 / config.num_train_timesteps, n + 1)
        s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
        sigmas = np.append(s, s[-1]).astype(np.float32).astype(np.float64)
        return (s * config.num_train_timesteps).astype(np.int64), sigmas

    rhos = schedule.train_rhos(config)
    log_rhos = np.log(rhos)
    if config.uses_sigma_grid:
        if config.solver_type != "logrho":
            s = _sigma_schedule(config, rhos[0].item(), rhos[-1].item(), n + 1)
            return _consistent_discrete_grid(sigma_to_t(s, log_rhos), rhos)
        s = _sigma_schedule(config, rhos[0].item(), rhos[-1].item(), n)
        t = sigma_to_t(s, log_rhos)
        t = t.round() if config.use_karras_sigmas else t
        return t.astype(np.int64), np.append(s, s[-1]).astype(np.float32).astype(np.float64)
    if config.timestep_spacing == "quadratic":
        top = config.num_train_timesteps - 1
        return _consistent_discrete_grid(np.linspace(top**0.5, 0.0, n + 1) ** 2, rhos)

    timesteps = _spaced_timesteps(config, n)
    sigmas = np.interp(timesteps, np.arange(len(rhos)), rhos)
    return timesteps, np.append(sigmas, rhos[0]).astype(np.float32).astype(np.float64)
