"""Noise tables of the forward process.

A discrete VP schedule is given by betas; `alphas_cumprod = prod(1 - beta)`,
`alpha_t = sqrt(alphas_cumprod)`, `sigma_t = sqrt(1 - alphas_cumprod)` and
`rho = sigma_t / alpha_t` (diffusers calls rho "sigma"), `lambda = -log rho`.
A flow-matching schedule is `x_t = (1 - s) x_0 + s eps`, so `alpha = 1 - s`,
`sigma = s`, `rho = s / (1 - s)`.

The tables are host-side numpy in float32, computed the way diffusers does, so
that timesteps derived from them match it exactly.
"""

from __future__ import annotations

import math

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


def alphas_cumprod(config: DEISConfig) -> np.ndarray:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), accumulated in float64 and stored in float32."""
    return np.cumprod(1.0 - betas(config), dtype=np.float64).astype(np.float32)


def train_rhos(config: DEISConfig) -> np.ndarray:
    """rho_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at every training timestep (diffusers' `sigmas`)."""
    ac = alphas_cumprod(config)
    with np.errstate(divide="ignore"):
        return np.sqrt((1 - ac) / ac)


def alpha_sigma(config: DEISConfig, s: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(alpha_t, sigma_t) from diffusers' `sigmas` entry s (rho for VP, the flow sigma for flow schedules)."""
    if config.use_flow_sigmas:
        return 1.0 - s, s
    alpha = 1.0 / jnp.sqrt(s * s + 1.0)
    return alpha, jnp.where(jnp.isinf(s), 1.0, s * alpha)
