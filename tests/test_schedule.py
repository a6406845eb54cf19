"""The noise tables of `deis_jax.schedule`: the continuous-time VP schedules and their inverse."""

import numpy as np
import pytest

import deis_jax as dj
from deis_jax import schedule

CONTINUOUS = [
    dj.DEISConfig(time_schedule="vp_linear"),
    dj.DEISConfig(time_schedule="vp_linear", continuous_beta_min=0.0, continuous_beta_max=12.0),
    dj.DEISConfig(time_schedule="vp_linear", continuous_beta_min=1.5, continuous_beta_max=1.6),
    dj.DEISConfig(time_schedule="vp_cosine"),
]


@pytest.mark.parametrize("config", CONTINUOUS, ids=lambda c: f"{c.time_schedule}-{c.continuous_beta_min}-"
                                                              f"{c.continuous_beta_max}")
def test_continuous_t_inverts_continuous_rho(config):
    """t(rho(t)) = t on [t_min, t_max] and rho(t(rho)) = rho (float64, to rounding)."""
    t = np.concatenate([np.linspace(config.t_min, config.t_max, 101), [0.02, 0.5, 0.9]])
    rho = schedule.continuous_rho(config, t)
    np.testing.assert_allclose(schedule.continuous_t(config, rho), t, rtol=1e-10, atol=0)
    rhos = np.geomspace(rho.min(), rho.max(), 50)
    np.testing.assert_allclose(schedule.continuous_rho(config, schedule.continuous_t(config, rhos)), rhos, rtol=1e-10)


def test_continuous_rho_closed_forms():
    """rho = sqrt(1 / alpha^2 - 1) with log alpha_t = -t^2 (b1 - b0) / 4 - t b0 / 2 (linear), and
    alpha_t^2 = f(t) / f(0), f(t) = cos^2((t + 0.008) / 1.008 * pi / 2) (cosine)."""
    t = np.linspace(1e-3, 0.99, 7)
    log_alpha = -t**2 * (20.0 - 0.1) / 4 - t * 0.1 / 2
    np.testing.assert_allclose(schedule.continuous_rho(dj.DEISConfig(time_schedule="vp_linear"), t),
                               np.sqrt(np.exp(-2 * log_alpha) - 1), rtol=1e-10)
    f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(schedule.continuous_rho(dj.DEISConfig(time_schedule="vp_cosine"), t),
                               np.sqrt(f(0) / f(t) - 1), rtol=1e-10)
