"""Noise tables of the forward process.

A discrete VP schedule is given by betas; `alphas_cumprod = prod(1 - beta)`,
`alpha_t = sqrt(alphas_cumprod)`, `sigma_t = sqrt(1 - alphas_cumprod)` and
`rho = sigma_t / alpha_t` (diffusers calls rho "sigma"), `lambda = -log rho`.
A flow-matching schedule is `x_t = (1 - s) x_0 + s eps`, so `alpha = 1 - s`,
`sigma = s`, `rho = s / (1 - s)`.

The tables are host-side numpy in float32, computed the way diffusers does (once per
config, cached and read-only), so that timesteps derived from them match it exactly.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

import jax.numpy as jnp
import numpy as np

from deis_jax.config import DEISConfig


def _alpha_bar_cosine(t: float) -> float:
    """Nichol & Dhariwal's cosine schedule, alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas(config: DEISConfig) -> np.ndarray:
    """The training betas, float32, shape [num_train_timesteps]."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, dtype=np.float32)
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    if config.beta_schedule == "scaled_linear":
        return (np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32)) ** 2
    # squaredcos_cap_v2: beta_i = min(1 - alpha_bar((i+1)/n) / alpha_bar(i/n), 0.999)
    return np.array(
        [min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999) for i in range(n)],
        dtype=np.float32,
    )


ZERO_SNR_CLAMP = 2.0**-24  # the last alpha_bar other diffusers schedulers use for zero-SNR schedules


def zero_terminal_snr(config: DEISConfig) -> bool:
    """A trained schedule ending at alpha_bar = 0 (pure noise), kept exact: possible only when the
    model determines x0 there (sample or v prediction: x0 = m or -m, eps = x at alpha = 0)."""
    return (config.trained_betas is not None and config.trained_betas[-1] == 1.0
            and config.prediction_type in ("sample", "v_prediction"))


@functools.lru_cache(maxsize=32)
def alphas_cumprod(config: DEISConfig) -> np.ndarray:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), accumulated in float64 and stored in float32.

    A final alpha_bar of 0 is kept when the prediction type determines x0 there
    (`zero_terminal_snr`); for epsilon or flow prediction x0 = (x - sigma eps) / 0 is undefined,
    so it is clamped to 2**-24 as diffusers' other schedulers do, and so is every alpha_bar below
    that (rescaled zero-SNR betas have some just before the end), so that rho still rises with t.

    Raises ValueError (naming the betas' field) for betas with rho_0 = 0 (1 - beta_0 rounds to 1
    in float32: log rho and eps = (x - alpha x0) / sigma are undefined at the grid's end) or with an
    infinite rho before the last timestep (alpha_bar below float32's range).
    """
    ac = np.cumprod(1.0 - betas(config), dtype=np.float64).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        bad = ~np.isfinite(np.sqrt((1 - ac) / ac))
    bad[-1] &= ac[-1] != 0  # a zero terminal alpha_bar is kept or clamped
    if ac[0] == 1 or bad.any():
        value: object
        if config.trained_betas is not None:
            field, value = "trained_betas", "<array>"
        elif config.beta_schedule == "squaredcos_cap_v2":
            field, value = "num_train_timesteps", config.num_train_timesteps
        else:  # the end whose beta is the larger one made alpha_bar vanish
            field = "beta_start" if ac[0] == 1 or config.beta_start > config.beta_end else "beta_end"
            value = getattr(config, field)
        why = ("1 - beta rounds to 1 in float32 at t = 0, so sigma(t = 0) = 0, where the sampler's last step is "
               "undefined; the first beta must exceed 2**-25" if ac[0] == 1 else
               f"alpha_bar = prod(1 - beta) falls below float32's range by timestep {int(np.argmax(bad))} of "
               f"{len(ac)}, so sigma is infinite there (only the last alpha_bar may be 0: zero terminal SNR); "
               "use smaller betas")
        raise ValueError(f"DEISConfig.{field}={value} is invalid: {why}.")
    if ac[-1] == 0 and not zero_terminal_snr(config):
        ac = np.maximum(ac, np.float32(ZERO_SNR_CLAMP))
    ac.flags.writeable = False  # cached: computed once per config
    return ac


@functools.lru_cache(maxsize=32)
def train_rhos(config: DEISConfig) -> np.ndarray:
    """rho_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at every training timestep (diffusers' `sigmas`)."""
    ac = alphas_cumprod(config)
    with np.errstate(divide="ignore"):
        rhos = np.sqrt((1 - ac) / ac)
    rhos.flags.writeable = False
    return rhos


@functools.lru_cache(maxsize=32)
def log_train_rhos(config: DEISConfig) -> np.ndarray:
    """log rho_t at every training timestep, as diffusers takes it (the log of the float32 table), stored
    in float64: the knots of t(rho) for placing timesteps, tAB's quadrature and `rho_at`."""
    logs = np.log(train_rhos(config)).astype(np.float64)  # rho > 0: sigma(t = 0) = 0 is rejected
    logs.flags.writeable = False
    return logs


def alpha_sigma(config: DEISConfig, s, xp: ModuleType = jnp):
    """(alpha_t, sigma_t) from diffusers' `sigmas` entry s (rho for VP, the flow sigma for flow schedules):
    alpha = 1 / sqrt(1 + rho^2), sigma = rho alpha (1 at rho = inf), (1 - s, s) for flow, (1, s) for VE."""
    if config.use_flow_sigmas:
        return 1.0 - s, s
    if config.is_ve:
        return xp.ones_like(s), s
    alpha = 1.0 / xp.sqrt(s * s + 1.0)
    with np.errstate(invalid="ignore"):  # inf * 0 at rho = inf, replaced
        return alpha, xp.where(xp.isinf(s), 1.0, s * alpha)


def sigma_from_rho(config: DEISConfig, rho):
    """diffusers' `sigmas` entry for a given rho: rho itself (VP), or s = rho / (1 + rho) (flow)."""
    return rho / (1.0 + rho) if config.use_flow_sigmas else rho


def rho_from_sigma(config: DEISConfig, s):
    """The inverse of `sigma_from_rho`: rho = s (VP), or s / (1 - s) (flow)."""
    return s / (1.0 - s) if config.use_flow_sigmas else s


def integration_variable(config: DEISConfig, rho):
    """kappa, the variable DEIS integrates in: rho for the noise form, d(x / alpha) = eps d rho; 1 / rho =
    alpha / sigma for the data-prediction form, d(x / sigma) = x0 d(1 / rho). Its own inverse."""
    if not config.predicts_data:
        return rho
    with np.errstate(divide="ignore"):
        return 1.0 / rho


# Continuous-time schedules: VP (score SDE), t in [t_min, t_max]; VE (EDM), t = sigma or c_noise = ln(sigma) / 4.
_COSINE_S = 0.008


def continuous_rho(config: DEISConfig, t, xp=np):
    """rho(t) = sigma_t / alpha_t = sqrt(1 / alpha_t^2 - 1).

    vp_linear: log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2.
    vp_cosine: alpha_t^2 = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008.
    ve:        rho = sigma = t, or e^(4 t) for EDM's c_noise input.
    """
    if config.is_ve:
        return xp.exp(4.0 * t) if config.ve_time_input == "c_noise" else t
    if config.time_schedule == "vp_linear":
        b0, b1 = config.continuous_beta_min, config.continuous_beta_max
        return xp.sqrt(xp.expm1(0.5 * t**2 * (b1 - b0) + t * b0))
    f0 = math.cos(_COSINE_S / (1 + _COSINE_S) * math.pi / 2)
    return xp.sqrt((f0 / xp.cos((t + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2)) ** 2 - 1.0)


def continuous_t(config: DEISConfig, rho, xp=np):
    """The inverse of `continuous_rho` (numpy float64, or jax.numpy)."""
    if config.is_ve:
        return xp.log(rho) / 4.0 if config.ve_time_input == "c_noise" else rho
    log1p_rho2 = xp.log1p(rho**2)  # = -2 log alpha_t
    if config.time_schedule == "vp_linear":
        b0, b1 = config.continuous_beta_min, config.continuous_beta_max
        return 2 * log1p_rho2 / (b0 + xp.sqrt(b0**2 + 2 * (b1 - b0) * log1p_rho2))
    f0 = math.cos(_COSINE_S / (1 + _COSINE_S) * math.pi / 2)
    return (1 + _COSINE_S) * 2 / math.pi * xp.arccos(f0 * xp.exp(-0.5 * log1p_rho2)) - _COSINE_S


def time_range(config: DEISConfig) -> tuple[float, float]:
    """[t_lo, t_hi], the model times a continuous schedule is sampled on: [t_min, t_max] (VP), or the times
    of [sigma_min, sigma_max] (VE)."""
    if config.is_ve:
        lo, hi = continuous_t(config, np.array([config.sigma_min, config.sigma_max]))
        return float(lo), float(hi)
    assert config.t_max is not None  # set by DEISConfig for VP schedules
    return config.t_min, config.t_max


def rho_at(config: DEISConfig, t, xp=np):
    """rho at a (possibly fractional) timestep t: analytic for continuous schedules; for discrete
    ones, linear interpolation of log rho between the training timesteps (the inverse of
    `spacing.sigma_to_t`). This is the noise level a model given t is trained for; past N - 2 it is
    inf on a zero-terminal-SNR schedule (interpolated without the node at infinity: 0 * inf = NaN)."""
    if config.is_continuous:
        return continuous_rho(config, t, xp)
    log_rho = log_train_rhos(config)
    zero_snr = np.isinf(log_rho[-1])
    finite = xp.asarray(log_rho[:-1] if zero_snr else log_rho)
    rho = xp.exp(xp.interp(t, xp.arange(finite.shape[0], dtype=finite.dtype), finite))
    return xp.where(t > finite.shape[0] - 1, xp.inf, rho) if zero_snr else rho
