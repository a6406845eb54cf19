"""Where the model is evaluated: the inference timesteps and their sigmas.

`timesteps_and_sigmas` returns diffusers' `scheduler.timesteps` and
`scheduler.sigmas` (rho for VP schedules, with one extra final entry); `grid` adds
the Runge-Kutta stages of rhork; `model_time` is the time a model is given at a noise level.
Host-side numpy in float64: the step count is static, so these are constants of the loop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import scipy.special

from deis_jax import schedule
from deis_jax.config import RUNGE_KUTTA, DEISConfig

if TYPE_CHECKING:
    import jax

KARRAS_RHO = 7.0  # Karras et al. (2022): sigmas uniform in sigma^(1/7)
SIGMA_FLOOR = 1e-10  # diffusers' floor before taking log sigma (`_sigma_to_t`)
BETA_SIGMAS_AB = 0.6  # Lee et al., "Beta Sampling is All You Need": Beta(0.6, 0.6) quantiles


def _leading_top(config: DEISConfig, n):
    """The first (largest) timestep of diffusers' leading spacing: N (num_train_timesteps // (N + 1)) + steps_offset."""
    return n * (config.num_train_timesteps // (n + 1)) + config.steps_offset


def leading_first_timestep(config: DEISConfig, num_inference_steps: int) -> int | None:
    """`_leading_top`, or None when the config does not place its steps by leading spacing."""
    if (config.timestep_spacing != "leading" or config.is_continuous or config.use_flow_sigmas
            or config.uses_sigma_grid):
        return None
    return int(_leading_top(config, num_inference_steps))


def max_inference_steps(config: DEISConfig) -> int:
    """The largest step count accepted: one whose discrete timesteps are all distinct and within
    0..num_train_timesteps-1 (10,000 for continuous time). diffusers' own sigma grids (flow, or
    Karras/exponential/beta for logrho) may repeat timesteps, and accept up to num_train_timesteps
    steps, as diffusers does. Leading spacing with a steps_offset also rejects the smaller counts
    whose first timestep passes the end (`leading_first_timestep`); 0 if none fits."""
    if config.is_continuous:
        return 10_000
    n = config.num_train_timesteps
    if config.use_flow_sigmas or (config.solver_type == "logrho" and config.uses_sigma_grid):
        return n
    if config.uses_sigma_grid:  # rounded to N + 1 distinct timesteps in 0..n-1 (the last one is 0)
        return n - 1
    if config.timestep_spacing == "leading":
        steps = np.arange(1, n)
        fits = steps[_leading_top(config, steps) <= n - 1]
        return int(fits.max()) if fits.size else 0
    return n if config.timestep_spacing == "trailing" else n - 1


def max_custom_steps(config: DEISConfig, ends_at_zero: bool) -> int:
    """The most steps a custom grid may have, whatever the config's timestep_spacing: as many as there are
    training timesteps where the grid's sigmas are kept (logrho and flow: the model may get a timestep twice,
    as with diffusers' sigma grids); one fewer where a discrete grid is rounded to distinct training
    timesteps (the other solvers), which takes one more timestep for where the solve ends, unless it ends
    at 0; `max_inference_steps` for continuous schedules."""
    if config.is_continuous:
        return max_inference_steps(config)
    n = config.num_train_timesteps
    return n if config.use_flow_sigmas or config.solver_type == "logrho" or ends_at_zero else n - 1


def check_flow_shift(config: DEISConfig, shift: float, name: str, value) -> None:
    """ValueError naming `name`=`value` unless the flow grids of every step count keep 0 < s < 1 in float32.

    diffusers' flow sigmas are shift s / (1 + (shift - 1) s) for s = k (1 - 1/N_train) / N, k = N..1:
    the largest at k = N must not round to 1 (alpha = 0), the smallest (N = N_train) not to 0.
    """
    n_train = config.num_train_timesteps
    s = (1.0 - 1.0 / n_train) * np.array([1.0, 1.0 / n_train])
    with np.errstate(over="ignore", invalid="ignore"):
        ends = (shift * s / (1.0 + (shift - 1.0) * s)).astype(np.float32)
    if not (0 < ends[1] and ends[0] < 1):
        raise ValueError(
            f"{name}={value!r} is invalid: a flow shift of {shift:.3g} puts the flow grid's sigmas at 1 "
            f"(alpha = 0) or 0 in float32; for num_train_timesteps={n_train} the shift must lie between "
            f"about {2.0**-149 * n_train:.3g} and {2.0**25 / (n_train - 1):.3g}.")


def check_config(config: DEISConfig) -> None:
    """ValueError naming the field when no step count gives a usable grid (called by DEISConfig):
    a training-noise table with sigma(t = 0) = 0 or an infinite sigma before the last timestep
    (`schedule.alphas_cumprod`), leading spacing whose steps_offset passes num_train_timesteps - 1
    for every step count, or a flow shift that rounds the flow sigmas to 1 or 0."""
    if config.is_continuous:
        return
    if config.use_flow_sigmas:
        check_flow_shift(config, config.flow_shift, "DEISConfig.flow_shift", config.flow_shift)
        return
    schedule.alphas_cumprod(config)
    if max_inference_steps(config) == 0:
        n, steps = config.num_train_timesteps, np.arange(1, config.num_train_timesteps)
        largest_offset = n - 1 - (_leading_top(config, steps) - config.steps_offset).min()
        raise ValueError(
            f"DEISConfig.steps_offset={config.steps_offset!r} is invalid: with timestep_spacing='leading' the "
            f"first timestep, N (num_train_timesteps // (N + 1)) + steps_offset, passes num_train_timesteps - 1 "
            f"= {n - 1} for every step count N; must be at most {largest_offset}.")


def _spaced_timesteps(config: DEISConfig, num_inference_steps: int) -> np.ndarray:
    n_train, n = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n_train // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    stride = n_train / n  # trailing; float rounding can make diffusers' arange one longer (a -1 at the end)
    return np.arange(n_train, 0, -stride)[:n].round().astype(np.int64) - 1


def sigma_to_t(sigma, log_train_rhos: np.ndarray, xp=np):
    """Fractional training timestep whose rho equals sigma: linear interpolation in log rho, clamped
    (sigma = inf, a zero-terminal-SNR start, is the last timestep); numpy, or jax.numpy for a traced sigma."""
    if xp is not np:  # the table in sigma's precision (no float64 request without x64)
        log_train_rhos = xp.asarray(log_train_rhos, dtype=xp.result_type(sigma))
    log_sigma = xp.log(xp.maximum(sigma, SIGMA_FLOOR))
    low = xp.clip(xp.searchsorted(log_train_rhos, log_sigma, side="right") - 1, 0, len(log_train_rhos) - 2)
    lo, hi = log_train_rhos[low], log_train_rhos[low + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = xp.where(lo == hi, 0.0, xp.clip((lo - log_sigma) / (lo - hi), 0, 1))  # flat: any of its t; the lower
    w = xp.where(xp.isposinf(log_sigma), 1.0, w)  # inf / inf next to a node at infinity
    return (1 - w) * low + w * (low + 1)


def _sigma_schedule(config: DEISConfig, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    if config.uses_karras_sigmas:
        inv_min, inv_max = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
        return (inv_max + ramp * (inv_min - inv_max)) ** KARRAS_RHO
    if config.use_exponential_sigmas:
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
    ppf = scipy.special.betaincinv(BETA_SIGMAS_AB, BETA_SIGMAS_AB, 1 - ramp)  # Beta(a, b) quantiles
    return sigma_min + ppf * (sigma_max - sigma_min)


def _strictly_decreasing(t: np.ndarray, top: int) -> np.ndarray:
    """Integer timesteps in [0, top], strictly decreasing, moved as little as rounding allows."""
    if len(t) > top + 1:
        raise ValueError(f"{len(t)} distinct timesteps do not fit in 0..{top}")
    t = np.clip(t, 0, top)
    for j in range(len(t) - 2, -1, -1):  # from the low end up
        t[j] = max(t[j], t[j + 1] + 1)
    t[0] = min(t[0], top)
    for j in range(1, len(t)):  # and back down from the top
        t[j] = min(t[j], t[j - 1] - 1)
    return t


def _consistent_discrete_grid(t_grid: np.ndarray, rhos: np.ndarray, to_zero: bool = False):
    """N + 1 rounded, strictly decreasing timesteps ending at 0 and their exact training rhos.

    The model is evaluated at the first N; each sigma is the noise level the model is trained
    for at its timestep. With `to_zero`, t_grid holds only the N evaluations, and the grid ends
    at sigma = 0, which is no training timestep.
    """
    t = _strictly_decreasing(np.round(t_grid).astype(np.int64), len(rhos) - 1)
    if to_zero:
        return t, np.append(rhos[t].astype(np.float64), 0.0)
    return t[:-1], rhos[t].astype(np.float64)


def _continuous_grid(config: DEISConfig, n: int):
    """N + 1 float times from t_max to t_min (uniform in t, in sqrt(t), or from a rho grid). A sigma grid ending
    at 0 is EDM's (and diffusers DPM-Solver's): the model at N levels from sigma_max to sigma_min, then 0."""
    t_lo, t_hi = schedule.time_range(config)
    edm_zero = config.uses_sigma_grid and config.final_sigmas_type == "zero"
    if config.uses_sigma_grid:
        rho_lo, rho_hi = schedule.continuous_rho(config, np.array([t_lo, t_hi]))
        t = schedule.continuous_t(config, _sigma_schedule(config, rho_lo, rho_hi, n if edm_zero else n + 1))
    elif config.timestep_spacing == "quadratic":
        t = np.linspace(t_hi**0.5, t_lo**0.5, n + 1) ** 2
    else:  # linspace, leading and trailing only differ in rounding to integers: uniform in t
        t = np.linspace(t_hi, t_lo, n + 1)
    t[-1], t[0] = t_lo, t_hi  # exactly, whatever the rounding through rho or sqrt(t) (a single level: t_hi)
    if edm_zero:
        return t, np.append(schedule.continuous_rho(config, t), 0.0)
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
    log_rhos = schedule.log_train_rhos(config)
    if config.uses_sigma_grid:
        if config.solver_type != "logrho":
            s = _sigma_schedule(config, rhos[0].item(), rhos[-1].item(), n + 1)
            return _consistent_discrete_grid(sigma_to_t(s, log_rhos), rhos)
        s = _sigma_schedule(config, rhos[0].item(), rhos[-1].item(), n)
        t = sigma_to_t(s, log_rhos)
        t = t.round() if config.uses_karras_sigmas else t
        return t.astype(np.int64), np.append(s, s[-1]).astype(np.float32).astype(np.float64)
    if config.timestep_spacing == "quadratic":
        top = config.num_train_timesteps - 1
        return _consistent_discrete_grid(np.linspace(top**0.5, 0.0, n + 1) ** 2, rhos)

    timesteps = _spaced_timesteps(config, n)
    sigmas = np.interp(timesteps, np.arange(len(rhos)), rhos)
    return timesteps, np.append(sigmas, rhos[0]).astype(np.float32).astype(np.float64)


def model_time(config: DEISConfig, log_rho: np.ndarray) -> np.ndarray:
    """The model time t at u = log rho, unrounded (float64): `custom_model_times(whole=False)` at that level."""
    return custom_model_times(config, schedule.sigma_from_rho(config, np.exp(log_rho)), whole=False)


def sigma_range(config: DEISConfig) -> tuple[float, float]:
    """(smallest, largest) noise level of the schedule in the `sigmas` convention: rho at t = 0 and at the
    last finite training timestep (discrete), rho(t_min) and rho(t_max) (continuous), or the open interval
    (0, 1) of the flow sigma s (flow: any shift of the grid is a valid grid)."""
    if config.is_continuous:
        lo, hi = schedule.continuous_rho(config, np.array(schedule.time_range(config)))
        return float(lo), float(hi)
    if config.use_flow_sigmas:
        return 0.0, 1.0
    rhos = schedule.train_rhos(config)
    finite = rhos[np.isfinite(rhos)]
    return float(finite[0]), float(finite[-1])


GRID_END_TOLERANCE = 1e-2  # relative: published grids round the ends (14.615 for 14.6146, 0.029 for 0.02917)


def check_sigmas(config: DEISConfig, sigmas, num_inference_steps: int | None) -> tuple[float, ...]:
    """A custom grid: N + 1 noise levels in the `sigmas` convention, strictly decreasing, inside the
    schedule's range (`sigma_range`, ends within a relative 1e-2 moved onto it), the last one may be 0
    (a final step to the denoised estimate), the first may be inf on a zero-terminal-SNR schedule (as its
    named grids). Returns it as a tuple of floats (a static, hashable key)."""
    try:
        s = np.array(sigmas, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"sigmas={sigmas!r} is invalid: must be a 1-D array of numbers.") from None
    want = "N + 1" if num_inference_steps is None else f"num_inference_steps + 1 = {num_inference_steps + 1}"
    if s.ndim != 1 or s.size < 2 or (num_inference_steps is not None and s.size != num_inference_steps + 1):
        raise ValueError(f"sigmas has shape {s.shape}: it must be 1-D with {want} entries (N steps need N + 1 "
                         "noise levels, the last one where the solve ends).")
    given = s.tolist()  # the messages show the grid as given
    lo, hi = sigma_range(config)
    last = len(s) - 1 - int(s[-1] == 0)  # the smallest positive entry
    # Only the ends are moved, and only where their neighbour stays strictly inside (no level repeats).
    if not config.use_flow_sigmas and hi < s[0] <= hi * (1 + GRID_END_TOLERANCE) and s[1] < hi:
        s[0] = hi
    if not config.use_flow_sigmas and lo * (1 - GRID_END_TOLERANCE) <= s[last] < lo and (
            last == 0 or s[last - 1] > lo):
        s[last] = lo
    finite = np.isfinite(s)
    finite[0] |= s[0] == np.inf and schedule.zero_terminal_snr(config)
    if not finite.all() or (s < 0).any() or not (np.diff(s) < 0).all():
        raise ValueError(f"sigmas={given} is invalid: must be finite (the first may be inf on a "
                         "zero-terminal-SNR schedule), >= 0 and strictly decreasing.")
    top = s[1] if s[0] == np.inf else s[0]  # the largest finite level
    # flow: positive levels also in float32 (the tables are cast to the compute dtype; s = 0 gives eps = 0 / 0)
    inside = (np.float32(s[last]) > 0 and s[0] < hi) if config.use_flow_sigmas else (lo <= s[last] and top <= hi)
    if not inside:
        interval = "(0, 1) (positive in float32)" if config.use_flow_sigmas else f"[{lo:.6g}, {hi:.6g}]"
        raise ValueError(f"sigmas={given} is invalid: every entry must lie in the schedule's range "
                         f"{interval} (the last may be 0).")
    if config.final_sigmas_type == "zero" and s[-1] != 0:
        raise ValueError(f"sigmas={given} is invalid with DEISConfig.final_sigmas_type='zero': the grid "
                         "must end at 0 (or use final_sigmas_type='sigma_min').")
    return tuple(float(v) for v in s)


def sigmas_from_timesteps(config: DEISConfig, timesteps, num_inference_steps: int | None) -> tuple[float, ...]:
    """The grid of custom training timesteps (diffusers' DPM-Solver `timesteps=`): their training rhos,
    then rho(t = 0) (or 0 with final_sigmas_type="zero"). Discrete VP schedules only."""
    if config.is_continuous or config.use_flow_sigmas:
        raise ValueError("timesteps= is invalid for a continuous or flow schedule (its times are not training "
                         "timesteps): pass sigmas= instead.")
    try:
        t = np.array(timesteps)
    except (TypeError, ValueError):
        t = np.array([None])
    top = config.num_train_timesteps - 1
    n_ok = num_inference_steps is None or t.size == num_inference_steps
    is_int = t.dtype.kind in "iu" or (t.dtype.kind == "f" and np.isfinite(t).all() and (t == np.round(t)).all())
    if t.ndim != 1 or t.size < 1 or not n_ok or not is_int or not ((t >= 0) & (t <= top)).all() \
            or not (np.diff(t) < 0).all():
        raise ValueError(f"timesteps={timesteps!r} is invalid: must be a 1-D array of num_inference_steps "
                         f"integers, strictly decreasing, in 0..{top}.")
    t = t.astype(np.int64)
    rhos = schedule.train_rhos(config)
    s = np.append(rhos[t], 0.0 if config.final_sigmas_type == "zero" else rhos[0])
    same = np.flatnonzero(np.diff(s) >= 0)
    if same.size:
        i = int(same[0])
        why = (f"its last timestep, {t[i]}, has the noise level where the solve ends with final_sigmas_type="
               f"'sigma_min', rho(t = 0) = {s[i]:.6g} (a zero-length step); drop it or use final_sigmas_type='zero'"
               if i == t.size - 1 else f"timesteps {t[i]} and {t[i + 1]} have the same noise level {s[i]:.6g}")
        raise ValueError(f"timesteps={timesteps!r} is invalid: {why}.")
    return check_sigmas(config, s, None)


def custom_timesteps_and_sigmas(config: DEISConfig, sigmas: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [N], sigmas [N + 1]) of a custom grid (`check_sigmas`), by the rule each grid already follows:
    logrho on discrete VP schedules keeps the sigmas and gives the model round(t(sigma)) (as for Karras
    sigmas); the other solvers round to distinct timesteps and take their training sigmas; flow gives
    int(s N); continuous schedules give t(rho) as a float. A final 0 stays 0 (the rounded grid then has N
    distinct timesteps, all evaluated; else N + 1, the last where the solve ends)."""
    s = np.array(sigmas, dtype=np.float64)
    if keeps_custom_sigmas(config):
        t = custom_model_times(config, s[:-1])
    else:
        to_zero = bool(s[-1] == 0)
        t_grid = sigma_to_t(s[:-1] if to_zero else s, schedule.log_train_rhos(config))
        t, s = _consistent_discrete_grid(t_grid, schedule.train_rhos(config), to_zero)
    return t, s


def keeps_custom_sigmas(config: DEISConfig) -> bool:
    """Whether a custom grid's sigmas are used as given (continuous, flow, or logrho on a discrete VP schedule);
    otherwise they are rounded to training timesteps and replaced by those timesteps' sigmas."""
    return config.is_continuous or config.use_flow_sigmas or config.solver_type == "logrho"


def custom_model_times(config: DEISConfig, s, xp=np, whole: bool = True):
    """The model's times at a kept custom grid's noise levels s > 0 (`keeps_custom_sigmas`): t(rho) clipped to
    `schedule.time_range` (continuous), floor(s N) (flow), round(t(sigma)) (discrete VP, `sigma_to_t`), as int32; with
    whole=False, s N and t(sigma) unrounded. numpy, or jax.numpy for a traced grid."""
    if config.is_continuous:
        return xp.clip(schedule.continuous_t(config, s, xp), *schedule.time_range(config))
    if config.use_flow_sigmas:
        t = s * config.num_train_timesteps
        return xp.floor(t).astype(np.int32) if whole else t
    t = sigma_to_t(s, schedule.log_train_rhos(config), xp)
    return xp.round(t).astype(np.int32) if whole else t


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where the model is evaluated (numpy; jax.numpy for a traced grid, see `coefficients.build`).

    timesteps:   [E] the model's time input at each evaluation.
    sigmas:      [E + 1] float64, diffusers' `sigmas` at each evaluation and at the end.
    step_sigmas: [N + 1] float64, the sigmas of the solver's steps: `sigmas` itself, except for rhork,
                 whose step i evaluates at the stages c_s of its integration variable (rho, or 1/rho in the
                 data-prediction form). A step to sigma = 0 is one evaluation (the denoised estimate).
    """

    timesteps: np.ndarray | jax.Array
    sigmas: np.ndarray | jax.Array
    step_sigmas: np.ndarray | jax.Array


def grid(config: DEISConfig, num_inference_steps: int, mu: float | None = None,
         sigmas: tuple[float, ...] | None = None) -> Grid:
    """The evaluation grid of `num_inference_steps` solver steps: a named grid (`timesteps_and_sigmas`) or a
    custom one (`custom_timesteps_and_sigmas`), ending at 0 with final_sigmas_type="zero", plus rhork's stages."""
    if sigmas is None:
        timesteps, step_sigmas = timesteps_and_sigmas(config, num_inference_steps, mu)
        if config.final_sigmas_type == "zero":
            step_sigmas[-1] = 0.0
    else:
        timesteps, step_sigmas = custom_timesteps_and_sigmas(config, sigmas)
    if config.solver_type != "rhork":
        return Grid(timesteps, step_sigmas, step_sigmas)
    rho = schedule.rho_from_sigma(config, step_sigmas)
    rk = len(rho) - 1 - int(rho[-1] == 0)  # Runge-Kutta steps; a step to 0 is a single evaluation
    c = np.asarray(RUNGE_KUTTA[config.solver_order][0])
    kappa = schedule.integration_variable(config, rho[: rk + 1])
    stage_kappa = (1 - c)[None, :] * kappa[:-1, None] + c[None, :] * kappa[1:, None]
    # at c = 0 and 1 the step's own levels, exactly (in the data form 1 / (1 / rho) may miss rho by an ulp)
    stage_rho = np.select([c == 0, c == 1], [rho[:rk, None], rho[1 : rk + 1, None]],
                          schedule.integration_variable(config, stage_kappa)).ravel()
    eval_rho = np.concatenate([stage_rho, rho[rk:-1]])
    return Grid(model_time(config, np.log(eval_rho)), schedule.sigma_from_rho(config, np.append(eval_rho, rho[-1])),
                step_sigmas)
