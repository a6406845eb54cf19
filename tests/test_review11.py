"""Review of `eta` and the adaptive sampler where options meet: the SDE's output law on VE and flow schedules
(closed form on Gaussian data), and the adaptive sampler's termination on a model that returns NaN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import schedule
from helpers import GAUSS_MEAN, GAUSS_STD
from test_adaptive import gaussian_model


def _output_law(config: dj.DEISConfig, n: int, eta: float) -> tuple[float, float, float]:
    """(mean, std, last sigma) of the sampler's output on 1-d data N(m, s^2) with the exact model output at each
    step's noise level (float64): the output is affine in (x_T, z_0, ..., z_{N-1}) ~ N(0, I), so mean = f(0) and
    std = |grad f|, exactly. (The level, not the timestep: flow timesteps are int(1000 s), a level off.)"""
    with jax.enable_x64(True):
        state = dj.set_timesteps(config, n, (), dtype=jnp.float64, eta=eta)

        def f(xz):
            def body(carry, tz):
                x, s = carry
                t, z = tz
                alpha, sigma = schedule.alpha_sigma(config, s.sigmas[s.step_index])
                eps = sigma * (x - alpha * GAUSS_MEAN) / (alpha**2 * GAUSS_STD**2 + sigma**2)
                x0 = (x - sigma * eps) / alpha
                out = {"epsilon": eps, "sample": x0, "flow_prediction": eps - x0}[config.prediction_type]
                return dj.step(s, out, t, x, variance_noise=z), None

            x_T = state.init_noise_sigma * xz[0]
            return jax.lax.scan(body, (x_T, state), (state.timesteps, xz[1:]))[0][0]

        zeros = jnp.zeros(n + 1, jnp.float64)
        mean, grad = jax.jit(jax.value_and_grad(f))(zeros)
        return float(mean), float(jnp.linalg.norm(grad)), float(state.sigmas[-1])


def _w2_to_marginal(config: dj.DEISConfig, n: int, eta: float) -> float:
    """W2 distance of the output law to the true marginal N(alpha m, alpha^2 s^2 + sigma^2) at the last level."""
    mean, std, s = _output_law(config, n, eta)
    alpha, sigma = schedule.alpha_sigma(config, np.float64(s), xp=np)
    return float(np.hypot(mean - alpha * GAUSS_MEAN, std - np.sqrt((alpha * GAUSS_STD) ** 2 + sigma**2)))


VE = dict(time_schedule="ve", prediction_type="sample")
FLOW = dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")


@pytest.mark.parametrize("kwargs,form,order", [(VE, "deis", 1), (VE, "data_prediction", 2),
                                               (FLOW, "deis", 2), (FLOW, "data_prediction", 3)])
def test_sde_output_law_on_ve_and_flow_schedules(kwargs, form, order):
    """eta = 1 on VE (x = x0 + sigma eps, x_T = sigma_max noise) and flow (alpha = 1 - s) schedules, to sigma = 0:
    the output law approaches the data law N(0.5, 0.3^2) as N grows (measured W2 at N = 100 / 200: VE 2e-4 / 1e-4
    (noise form), 8e-4 / 2e-4 (data); flow 9e-4 / 8e-4, 4e-3 / 1e-3). A wrong noise std (e.g. sigma' for alpha')
    or a wrong x_T scale leaves an O(1) bias."""
    config = dj.DEISConfig(solver_order=order, algorithm_type=form, final_sigmas_type="zero", **kwargs)
    w2 = [_w2_to_marginal(config, n, 1.0) for n in (100, 200)]
    assert w2[1] < 5e-3 and w2[1] <= w2[0] * 1.05, w2


def test_adaptive_stops_on_a_model_that_returns_nan():
    """A model whose output turns NaN part-way (t < 500): no step onto a NaN output is accepted (its error estimate
    is non-finite), so the solve creeps up to t = 500's level until max_evaluations runs out (no hang) and says
    where: a finite sample at sigma_end, just above that level and far above the schedule's end."""
    config = dj.DEISConfig()
    exact = gaussian_model(config)

    def model(x, t):
        return jnp.where(t < 500, jnp.nan, exact(x, t))

    x, info = jax.jit(lambda n: dj.sample_adaptive_from_noise(model, n, config=config, max_evaluations=50))(
        jnp.ones((2, 3)))
    assert int(info.evaluations) == 50 and int(info.rejected) > 0 and np.isfinite(np.asarray(x)).all()
    boundary = float(schedule.rho_at(config, 500.0))
    assert boundary <= float(info.sigma_end) < 1.2 * boundary
