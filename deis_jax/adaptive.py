"""Error-controlled adaptive DEIS: the step sizes chosen while solving, to a tolerance.

The probability-flow ODE is solved in u = log kappa, kappa = `schedule.integration_variable(rho)` (rho in the
noise form, 1 / rho in the data form), from the schedule's largest noise level to its smallest, with the
log-rho DEIS multistep update of variable step: over a step kappa -> kappa' through the last p nodes,

    x_pred = a x + sum_{j<p} c_j m_j,   a = scale' / scale,   c_j = scale' * integral ell_j(log kappa) d kappa,

m = eps (noise form, scale = alpha) or x0 (data form, scale = sigma), the weights the closed form of
`coefficients.logrho_weights`; p ramps up from 1 to K = solver_order.

Predictor-corrector (UniPC's idea in DEIS's weights): the model is evaluated once at (x_pred, kappa'), and the
corrector is the same update with the Lagrange polynomial through the new node and the p last ones (order
p + 1, the weights of the step run backwards from kappa'):

    x_corr = a x + c'_0 m_new + sum_{j<p} c'_{j+1} m_j.

Error estimate (Milne's device): est = x_corr - x_pred, the predictor's local error O(h^(p+1)) to leading
order. It sees the new evaluation, so a change of the model output ahead of the step is caught (an estimate
from the history alone, orders p against p - 1, missed the steep part of the discrete cosine schedule by 14-17
times the tolerance). An accepted step keeps x_corr (local extrapolation, order p + 1) and m_new joins the
history (evaluated at x_pred, as in UniPC); a rejected step costs its evaluation. With local extrapolation the
global error is proportional to the tolerance: order 2 lands within a factor 3 of it, order 3 (an order-4
corrector) 3-10 times below it (tests/test_adaptive.py, benchmarks/adaptive.py).

Norm: err = RMS over all elements of the sample (the whole batch: one step sequence) of
est / (atol + rtol max(|x|, |x_corr|)); a step is accepted when err <= 1 (and finite).

Controller (diffrax's `PIDController`, a PI controller): h_next = h * clip(0.9 err^(-0.7/q) err_prev^(0.4/q),
lo, hi), q = p + 1, err_prev the last accepted step's error; after an accepted step [0.2, 10] (at most 1 right
after a rejection), after a rejected one [0.2, 1]; a non-finite estimate shrinks by 0.2. MAX_REJECTIONS in a row
stop the solve.

The first step (p = 1: DDIM predictor, order-2 corrector) starts from h_0 = sqrt(rtol) in u (log rho spans about
10 on the usual schedules); a step that would leave less than a tenth of itself before the end goes to the end.
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
INITIAL_STEP = 1.0  # h_0 = INITIAL_STEP * sqrt(rtol), in u = log kappa
MAX_REJECTIONS = 10  # consecutive rejections (each an evaluation; the step shrunk by 0.2^10) stop the solve
END_STRETCH = 1.1  # a step within 10% of the end goes to the end


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["evaluations", "accepted", "rejected", "sigma_start", "sigma_end", "sigmas"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class AdaptiveInfo:
    """What an adaptive solve did, a pytree (under `jax.vmap`, one per mapped call).

    evaluations: int32, model calls made: 1 (the start) + accepted + rejected (+ 1 for the final x0 with
                 final_sigmas_type="zero").
    accepted, rejected: int32, steps taken and steps retried smaller (each costs one evaluation).
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
                         "must be 2 or 3 (the predictor's order; the corrector's is one more).")
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


def _corrector_weights(config: DEISConfig, kappas, kappa_next, dtype):
    """[K + 1, K + 1]: row q - 1 holds the order-q weights of (m_new, m_0, ..., m_{K-1}) for the step kappas[0] ->
    kappa_next, the Lagrange basis through kappa_next, kappas[0], ...: `coefficients.logrho_weights` on the step
    run backwards, kappa_next -> kappas[0], negated."""
    order = config.solver_order
    nodes = jnp.concatenate([kappas[::-1], kappa_next[None], kappas[:1]])
    rows = [-coefficients.logrho_weights(nodes, np.array([1] * order + [q]), order + 1, jnp)[-1]
            for q in range(1, order + 2)]
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

    def step(carry):
        x, history, kappas, nodes, dt, err_prev, evaluations, accepted, rejected, sigmas, fails = carry
        p = jnp.minimum(nodes, order)  # the predictor's order; the corrector's is p + 1
        remaining = jnp.abs(jnp.log(kappa_end) - jnp.log(kappas[0]))
        last = END_STRETCH * dt >= remaining  # no sliver of a step left at the end
        taken = jnp.where(last, remaining, dt)
        kappa_next = jnp.where(last, kappa_end, kappas[0] * jnp.exp(direction * dt))
        scale, scale_next = scale_of(sigma_of(kappas[0])), scale_of(sigma_of(kappa_next))
        w = scale_next * _lag_weights(config, kappas, kappa_next, dtype)[p - 1]  # [K], by lag
        x_scaled = (scale_next / scale) * x
        x_pred = x_scaled
        for j in range(order):
            x_pred = x_pred + w[j] * history[j]
        _, m_new = evaluate(x_pred, kappa_next)
        wc = scale_next * _corrector_weights(config, kappas, kappa_next, dtype)[p]  # order p + 1, [K + 1]
        x_corr = x_scaled + wc[0] * m_new
        for j in range(order):
            x_corr = x_corr + wc[j + 1] * history[j]
        ratio = (x_corr - x_pred) / (atol + rtol * jnp.maximum(jnp.abs(x), jnp.abs(x_corr)))
        err = jnp.sqrt(jnp.mean(ratio * ratio))
        ok = jnp.isfinite(err) & (err <= 1.0)
        q = (p + 1).astype(dtype)
        e = jnp.maximum(err, 1e-10)
        pi = SAFETY * e ** (-(PCOEFF + ICOEFF) / q) * err_prev ** (PCOEFF / q)
        factor = jnp.where(ok, jnp.clip(pi, FACTOR_MIN, jnp.where(fails > 0, 1.0, FACTOR_MAX)),
                           jnp.where(jnp.isfinite(err), jnp.clip(pi, FACTOR_MIN, 1.0), FACTOR_MIN))
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        return (keep(x_corr, x), keep(jnp.concatenate([m_new[None], history[:-1]]), history),
                keep(jnp.concatenate([kappa_next[None], kappas[:-1]]), kappas), nodes + ok.astype(jnp.int32),
                taken * factor, keep(e, err_prev), evaluations + 1, accepted + ok.astype(jnp.int32),
                rejected + (~ok).astype(jnp.int32), keep(sigmas.at[accepted + 1].set(sigma_of(kappa_next)), sigmas),
                jnp.where(ok, 0, fails + 1))

    def running(carry):
        kappas, evaluations, fails = carry[2], carry[6], carry[10]
        return (kappas[0] != kappa_end) & (evaluations < max_evaluations - to_zero) & (fails < MAX_REJECTIONS)

    init_sigma = s_start if config.is_ve else 1.0
    x = (noise * init_sigma).astype(noise.dtype).astype(dtype)
    kappas = kappa_start * jnp.exp(-direction * jnp.arange(order, dtype=dtype))  # distinct nodes before the start
    history = jnp.zeros((order, *x.shape), dtype).at[0].set(evaluate(x, kappa_start)[1])
    sigmas = jnp.full((max_evaluations + 1,), jnp.nan, dtype).at[0].set(s_start)
    carry = (x, history, kappas, jnp.int32(1), jnp.asarray(INITIAL_STEP * math.sqrt(rtol), dtype),
             jnp.asarray(1.0, dtype), jnp.int32(1), jnp.int32(0), jnp.int32(0), sigmas, jnp.int32(0))
    x, _, kappas, _, _, _, evaluations, accepted, rejected, sigmas, _ = jax.lax.while_loop(running, step, carry)
    at_end = kappas[0] == kappa_end
    sigma_end = sigma_of(kappas[0])
    if to_zero:
        x = jax.lax.cond(at_end, lambda: evaluate(x, kappas[0])[0], lambda: x)
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
