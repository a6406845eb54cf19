"""Error-controlled adaptive DEIS: the step sizes chosen while solving, to a tolerance.

The probability-flow ODE is solved in u = log kappa, kappa = `schedule.integration_variable(rho)` (rho in the
noise form, 1 / rho in the data form), from the schedule's largest noise level to its smallest, with the
log-rho DEIS multistep update of variable step: over a step kappa -> kappa', through the last k nodes,

    x_k' = a x + sum_{j<k} c_j m_j,   a = scale' / scale,   c_j = scale' * integral ell_j(log kappa) d kappa,

m = eps (noise form, scale = alpha) or x0 (data form, scale = sigma), the weights the closed form of
`coefficients.logrho_weights`. One model evaluation per accepted step: the new node's output joins a history
of the last K = solver_order nodes (the order ramps up from 1).

Error estimate: est = x_k' - x_{k-1}' over the same step (orders k and k - 1 from the same history). The
order-(k-1) update's local error is O(h^k) and the order-k one's O(h^(k+1)), so est is the lower order's
local error to leading order; it costs no evaluation, so a rejected step costs none. The order-k value is
propagated (local extrapolation): each accepted step's own error is below the estimate's, and over the
N ~ tol^(-1/k) steps of a solve the global error is proportional to the tolerance.

Norm: err = RMS over all elements of the sample (the whole batch: one step sequence) of
est / (atol + rtol max(|x|, |x'|)); a step is accepted when err <= 1. No calibration factor: on the exact
Gaussian mixture the achieved error is then 0.6-2.2 times the tolerance (tests/test_adaptive.py).

Controller (diffrax's `PIDController`, a PI controller): h_next = h * clip(0.9 err^(-0.7/k) err_prev^(0.4/k),
lo, hi), with err_prev the last accepted step's error; an accepted step gives [1, 10] (no growth, [1, 1],
right after a rejection), a rejected one [0.2, 1]; a non-finite estimate is a rejection by 0.2.

The first step has a single node, so no estimate: it takes the order-1 (DDIM) step h_0 = 0.1 sqrt(rtol) in u
(log rho spans about 10 on the usual schedules), whose local error, of order h_0^2 relative to x, is a
hundredth of rtol; the controller grows the steps from there by up to 10x per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax import coefficients, schedule, spacing
from deis_jax.config import DEISConfig
from deis_jax.sampling import ModelFn
from deis_jax.solver import _compute_dtype, check_shape, to_x0_eps

SAFETY, PCOEFF, ICOEFF = 0.9, 0.4, 0.3  # diffrax's PIDController defaults for a PI controller
FACTOR_MIN, FACTOR_MAX = 0.2, 10.0
INITIAL_STEP = 0.1  # h_0 = INITIAL_STEP * sqrt(rtol), in u = log kappa
MAX_REJECTIONS = 40  # consecutive rejections (the step shrunk by 0.2^40) stop the solve


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["evaluations", "accepted", "rejected", "sigma_start", "sigma_end", "sigmas"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class AdaptiveInfo:
    """What an adaptive solve did, a pytree (under `jax.vmap`, one per mapped call).

    evaluations: int32, model calls made (accepted, plus one for the final x0 with final_sigmas_type="zero").
    accepted, rejected: int32, steps taken and steps retried smaller (a rejection costs no evaluation).
    sigma_start, sigma_end: the noise levels (the `sigmas` convention: rho for VP, s for flow, sigma for VE)
                 where the solve started and ended: the schedule's range, sigma_end 0 with final_sigmas_type=
                 "zero"; larger than that when `max_evaluations` ran out (or MAX_REJECTIONS were reached).
    sigmas:      [max_evaluations + 1], the accepted noise levels in order, NaN after the last: a fixed grid
                 for `sample(..., sigmas=info.sigmas[~jnp.isnan(info.sigmas)])`.
    """

    evaluations: jax.Array
    accepted: jax.Array
    rejected: jax.Array
    sigma_start: jax.Array
    sigma_end: jax.Array
    sigmas: jax.Array


def _check(config: DEISConfig, rtol, atol, max_evaluations) -> tuple[float, float, int]:
    if not isinstance(config, DEISConfig):
        raise ValueError(f"config={config!r} is invalid: must be a DEISConfig.")
    if config.solver_type != "logrho":
        raise ValueError(f"DEISConfig.solver_type={config.solver_type!r} is invalid for the adaptive sampler: "
                         "must be 'logrho' (its weights are closed form for any step).")
    if config.solver_order < 2:
        raise ValueError(f"DEISConfig.solver_order={config.solver_order!r} is invalid for the adaptive sampler: "
                         "must be 2 or 3 (the error estimate compares orders k and k - 1).")
    if schedule.zero_terminal_snr(config):
        raise ValueError("DEISConfig.trained_betas is invalid for the adaptive sampler: a zero-terminal-SNR "
                         "schedule (last beta = 1, sample/v prediction) starts at rho = inf; use `sample`.")
    if config.use_dynamic_shifting:
        raise ValueError("DEISConfig.use_dynamic_shifting=True is invalid for the adaptive sampler: it takes no "
                         "mu; set flow_shift instead.")
    tols = []
    for name, value in (("rtol", rtol), ("atol", atol)):
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} is invalid: must be a finite number > 0.")
        tols.append(float(value))
    if (isinstance(max_evaluations, bool) or not isinstance(max_evaluations, (int, np.integer))
            or max_evaluations < 2):
        raise ValueError(f"max_evaluations={max_evaluations!r} is invalid: must be an int >= 2.")
    return tols[0], tols[1], int(max_evaluations)


def _levels(config: DEISConfig) -> tuple[float, float]:
    """(start, end) noise levels, the `sigmas` convention: `spacing.sigma_range`; for flow schedules, whose
    range is the open (0, 1), the largest and smallest level of the named grids (those of N = num_train_timesteps
    steps: s = shift x / (1 + (shift - 1) x), x from 1 - 1/N down to (1 - 1/N) / N)."""
    if config.use_flow_sigmas:
        sigmas = spacing.timesteps_and_sigmas(config, config.num_train_timesteps)[1]
        return float(sigmas[0]), float(sigmas[-1])
    lo, hi = spacing.sigma_range(config)
    return hi, lo


def _lag_weights(config: DEISConfig, kappas, kappa_next, dtype):
    """[K, K]: row k - 1 holds the order-k weights of lag j (0 = newest node) for the step kappas[0] -> kappa_next,
    `coefficients.logrho_weights` on the nodes kappas[K-1], ..., kappas[0], kappa_next."""
    order = config.solver_order
    nodes = jnp.concatenate([kappas[::-1], kappa_next[None]])
    rows = [coefficients.logrho_weights(nodes, np.array([1] * (order - 1) + [k]), order, jnp)[-1]
            for k in range(1, order + 1)]
    return jnp.stack(rows).astype(dtype)


def sample_adaptive_from_noise(
    model_fn: ModelFn,
    noise: jax.Array,
    *,
    config: DEISConfig = DEISConfig(),
    rtol: float = 1e-3,
    atol: float = 1e-3,
    max_evaluations: int = 100,
) -> tuple[jax.Array, AdaptiveInfo]:
    """Solve the probability-flow ODE from x_T = init sigma * `noise` (1, or sigma_max for VE) with adaptive
    log-rho DEIS (module docstring); returns (x_0 in `noise.dtype`, `AdaptiveInfo`).

    From the schedule's largest noise level to its smallest (`spacing.sigma_range`; flow: the named grids'
    ends), then with final_sigmas_type="zero" one more evaluation returning the denoised estimate x0 (that
    evaluation is kept in reserve out of `max_evaluations`). `model_fn(x, t)` gets t =
    `spacing.custom_model_times(..., whole=False)` of the level, a float scalar (an unrounded training timestep
    on discrete schedules). One `lax.while_loop` (jit-able; the config and the arguments but `noise` are
    static); at most `max_evaluations` model calls; computed in at least float32 (float64 for float64 noise
    under x64). Needs solver_type="logrho" and solver_order 2 or 3.
    """
    rtol, atol, max_evaluations = _check(config, rtol, atol, max_evaluations)
    noise = jnp.asarray(noise)
    dtype = _compute_dtype(noise.dtype)
    order = config.solver_order
    s_start, s_end = _levels(config)
    to_zero = config.final_sigmas_type == "zero"
    kappa_of = lambda s: schedule.integration_variable(config, schedule.rho_from_sigma(config, s))  # noqa: E731
    sigma_of = lambda kappa: schedule.sigma_from_rho(config, schedule.integration_variable(config, kappa))  # noqa: E731
    kappa_start, kappa_end = (jnp.asarray(kappa_of(s), dtype) for s in (s_start, s_end))
    direction = 1.0 if config.predicts_data else -1.0  # kappa = 1 / rho rises, rho falls
    alpha_sigma = functools.partial(schedule.alpha_sigma, config)
    scale_of = lambda s: alpha_sigma(s)[1 if config.predicts_data else 0]  # noqa: E731

    def evaluate(x, kappa):
        """(x0, m) at node kappa: m = eps, or x0 in the data form."""
        s = sigma_of(kappa)
        alpha, sigma = alpha_sigma(s)
        t = spacing.custom_model_times(config, s, xp=jnp, whole=False)
        out = model_fn(x.astype(noise.dtype), t).astype(dtype)
        x0, eps = to_x0_eps(config, out, x, alpha, sigma, s, config.predicts_data or to_zero)
        return x0, (x0 if config.predicts_data else eps)

    def trial(x, history, kappas, accepted, dt):
        """The step of size dt (clipped at the end): (x', kappa', err)."""
        remaining = jnp.abs(jnp.log(kappa_end) - jnp.log(kappas[0]))
        last = dt >= remaining
        kappa_next = jnp.where(last, kappa_end, kappas[0] * jnp.exp(direction * dt))
        scale, scale_next = scale_of(sigma_of(kappas[0])), scale_of(sigma_of(kappa_next))
        weights = scale_next * _lag_weights(config, kappas, kappa_next, dtype)  # [order, lag]
        k = jnp.minimum(accepted + 1, order)  # nodes in the history
        lag_of_slot = (accepted - jnp.arange(order)) % order  # slot of node n: n % order
        w_hi, w_lo = weights[k - 1][lag_of_slot], jnp.where(k > 1, weights[k - 2], 0.0)[lag_of_slot]
        x_next = (scale_next / scale) * x
        est = jnp.zeros_like(x)
        for q in range(order):
            x_next = x_next + w_hi[q] * history[q]
            est = est + (w_hi[q] - w_lo[q]) * history[q]
        ratio = est / (atol + rtol * jnp.maximum(jnp.abs(x), jnp.abs(x_next)))
        err = jnp.sqrt(jnp.mean(ratio * ratio))
        return x_next, kappa_next, jnp.where(k > 1, err, 0.0), jnp.minimum(dt, remaining)

    def step(carry):
        x, history, kappas, dt, err_prev, evaluations, accepted, rejected, sigmas, stalled = carry
        _, m = evaluate(x, kappas[0])
        history = jax.lax.dynamic_update_index_in_dim(history, m, accepted % order, 0)
        k = jnp.minimum(accepted + 1, order).astype(dtype)

        def retry(inner):
            dt, tries, _, _, _, _ = inner
            x_next, kappa_next, err, taken = trial(x, history, kappas, accepted, dt)
            finite = jnp.isfinite(err)
            ok = finite & (err <= 1.0)
            e = jnp.maximum(err, 1e-10)
            pi = SAFETY * e ** (-(PCOEFF + ICOEFF) / k) * err_prev ** (PCOEFF / k)
            factor = jnp.where(ok, jnp.clip(pi, 1.0, jnp.where(tries > 0, 1.0, FACTOR_MAX)),
                               jnp.where(finite, jnp.clip(pi, FACTOR_MIN, 1.0), FACTOR_MIN))
            factor = jnp.where(k > 1, factor, 1.0)  # the first step has no estimate: keep h_0
            return taken * factor, tries + 1, ok, x_next, kappa_next, e

        init = (dt, jnp.int32(0), jnp.bool_(False), x, kappas[0], err_prev)
        dt, tries, ok, x_next, kappa_next, err = jax.lax.while_loop(
            lambda inner: ~inner[2] & (inner[1] < MAX_REJECTIONS), retry, init)
        rejected = rejected + tries - ok.astype(jnp.int32)
        x = jnp.where(ok, x_next, x)
        kappas = jnp.where(ok, jnp.concatenate([kappa_next[None], kappas[:-1]]), kappas)
        sigmas = jnp.where(ok, sigmas.at[accepted + 1].set(sigma_of(kappa_next)), sigmas)
        err_prev = jnp.where(ok & (accepted > 0), err, err_prev)
        return (x, history, kappas, dt, err_prev, evaluations + 1, accepted + ok.astype(jnp.int32), rejected,
                sigmas, ~ok)

    def running(carry):
        kappas, evaluations, stalled = carry[2], carry[5], carry[9]
        return (kappas[0] != kappa_end) & (evaluations < max_evaluations - to_zero) & ~stalled

    init_sigma = s_start if config.is_ve else 1.0
    x = (noise * init_sigma).astype(noise.dtype).astype(dtype)
    kappas = kappa_start * jnp.exp(-direction * jnp.arange(order, dtype=dtype))  # distinct nodes before the start
    sigmas = jnp.full((max_evaluations + 1,), jnp.nan, dtype).at[0].set(s_start)
    carry = (x, jnp.zeros((order, *x.shape), dtype), kappas, jnp.asarray(INITIAL_STEP * math.sqrt(rtol), dtype),
             jnp.asarray(1.0, dtype), jnp.int32(0), jnp.int32(0), jnp.int32(0), sigmas, jnp.bool_(False))
    x, _, kappas, _, _, evaluations, accepted, rejected, sigmas, _ = jax.lax.while_loop(running, step, carry)
    at_end = kappas[0] == kappa_end
    sigma_end = sigma_of(kappas[0])
    if to_zero:
        x = jnp.where(at_end, jax.lax.cond(at_end, lambda: evaluate(x, kappas[0])[0], lambda: x), x)
        sigmas = jnp.where(at_end, sigmas.at[accepted + 1].set(0.0), sigmas)
        evaluations = evaluations + at_end.astype(jnp.int32)
        sigma_end = jnp.where(at_end, 0.0, sigma_end)
    info = AdaptiveInfo(evaluations=evaluations, accepted=accepted, rejected=rejected,
                        sigma_start=jnp.asarray(s_start, dtype), sigma_end=sigma_end.astype(dtype), sigmas=sigmas)
    return x.astype(noise.dtype), info


def sample_adaptive(
    model_fn: ModelFn,
    key: jax.Array,
    shape: Sequence[int],
    *,
    config: DEISConfig = DEISConfig(),
    rtol: float = 1e-3,
    atol: float = 1e-3,
    max_evaluations: int = 100,
    dtype=jnp.float32,
) -> tuple[jax.Array, AdaptiveInfo]:
    """Draw x_T ~ N(0, I) of `shape` and `dtype` from `key`, then `sample_adaptive_from_noise`."""
    noise = jax.random.normal(key, check_shape(shape), dtype)
    return sample_adaptive_from_noise(model_fn, noise, config=config, rtol=rtol, atol=atol,
                                      max_evaluations=max_evaluations)
