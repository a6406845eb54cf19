"""`DEISState` and the pure scheduler functions: `set_timesteps`, `convert_model_output`, `step`.

A step is one fused update with precomputed weights (see `coefficients`):

    eps_i     = convert_model_output(model_output)      # written into the history ring
    x_{i+1}   = a_i x_i + sum_slots w_{i,slot} history[slot]

The history is a fixed ring `model_outputs[solver_order, *shape]`; eps_i goes to slot
i % solver_order, and `weights[i, slot]` already holds c_{i,j} for the lag j living there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from deis_jax import coefficients, schedule, spacing
from deis_jax.config import DEISConfig
from deis_jax.schedule import alpha_sigma


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "sigmas", "orders", "alpha_t", "sigma_t", "a", "b", "weights", "noise", "step_index",
                 "model_outputs"],
    meta_fields=["config", "requested_steps", "mu", "begin_index", "grid_sigmas", "eta"],
)
@dataclasses.dataclass(frozen=True)
class DEISState:
    """Schedule and solver state, a pytree; `config`, `requested_steps`, `mu`, `begin_index`, `grid_sigmas`
    and `eta` are static metadata (what `set_timesteps` was called with).

    requested_steps: the `num_inference_steps` asked for (`rhork` has solver_order evaluations per step).
    mu:            the dynamic-shifting parameter of the schedule, or None.
    begin_index:   the step the solve starts at (img2img); `run_loop` runs steps begin_index..N-1.
    grid_sigmas:   the custom grid (`sigmas=` or `timesteps=` of `set_timesteps`) as a tuple, or None.
    eta:           the SDE's noise scale (0: the probability-flow ODE; see `coefficients.stochastic`).

    timesteps:     [N], the time passed to the model at each step: int32 training timesteps (diffusers'
                   values), float for rhork stages and continuous schedules (README: "What `t` is").
    sigmas:        [N + 1], diffusers' `sigmas` (rho = sigma_t / alpha_t for VP schedules).
    orders:        [N] int32, k_i: how many past outputs step i uses.
    alpha_t, sigma_t: [N], the noise levels at each step's start.
    a:             [N], x_{i+1} / x_i's scale ratio: alpha_{i+1} / alpha_i (sigma ratio in the data form).
    b:             [N], weight of x0 (nonzero only on a step from rho = inf, zero terminal SNR, or to sigma = 0).
    weights:       [N, solver_order], weight of each history slot at step i.
    noise:         [N], the std of the fresh noise step i adds (all 0 when eta = 0).
    step_index:    int32 scalar, the next step to take.
    model_outputs: [solver_order, *shape], ring buffer of converted outputs (eps, or x0 in the data form).
    """

    config: DEISConfig
    requested_steps: int
    mu: float | None
    begin_index: int
    grid_sigmas: tuple[float, ...] | None
    eta: float
    timesteps: jax.Array
    sigmas: jax.Array
    orders: jax.Array
    alpha_t: jax.Array
    sigma_t: jax.Array
    a: jax.Array
    b: jax.Array
    weights: jax.Array
    noise: jax.Array
    step_index: jax.Array
    model_outputs: jax.Array

    @property
    def num_inference_steps(self) -> int:
        """Number of `step` calls (model evaluations) in the schedule, diffusers' `len(timesteps)`."""
        return self.timesteps.shape[0]

    @property
    def init_noise_sigma(self):
        """The standard deviation of x_T: 1 (VP, flow), or the grid's first sigma (VE: x_T ~ N(0, sigma_0^2))."""
        return self.sigmas[0] if self.config.is_ve else 1.0

    @property
    def ends_at_zero(self) -> bool:
        """The last step goes to sigma = 0, where the sample is the model's denoised estimate x0."""
        return self.config.final_sigmas_type == "zero" or (self.grid_sigmas is not None and self.grid_sigmas[-1] == 0)


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    ok = isinstance(shape, (tuple, list)) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape
    )
    if not ok:
        raise ValueError(f"shape={shape!r} is invalid: must be a tuple of positive ints.")
    return tuple(int(d) for d in shape)


def _check_steps(config: DEISConfig, num_inference_steps: int) -> int:
    limit = spacing.max_inference_steps(config)
    if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer))
            or not 1 <= num_inference_steps <= limit):
        raise ValueError(
            f"num_inference_steps={num_inference_steps!r} is invalid: must be an int in 1..{limit} "
            f"for timestep_spacing={config.timestep_spacing!r} and num_train_timesteps={config.num_train_timesteps}."
        )
    top = spacing.leading_first_timestep(config, int(num_inference_steps))
    if top is not None and top > config.num_train_timesteps - 1:
        raise ValueError(
            f"num_inference_steps={num_inference_steps!r} is invalid with timestep_spacing='leading' and "
            f"steps_offset={config.steps_offset}: its first timestep, {top}, passes num_train_timesteps - 1 = "
            f"{config.num_train_timesteps - 1}; choose another step count or a smaller steps_offset."
        )
    return int(num_inference_steps)


def _check_mu(config: DEISConfig, mu: float | None) -> float | None:
    if mu is None:
        return None
    if not config.use_dynamic_shifting:
        raise ValueError(f"mu={mu!r} is invalid: it is only used with DEISConfig(use_dynamic_shifting=True).")
    try:
        value = float(mu)
    except (TypeError, jax.errors.ConcretizationTypeError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"mu={mu!r} is invalid: must be a finite Python float (it shapes the static schedule).")
    if config.use_flow_sigmas:
        with np.errstate(over="ignore"):
            spacing.check_flow_shift(config, float(np.exp(value)), "mu", mu)
    return value


def state_tables(config: DEISConfig, grid: spacing.Grid, begin_index: int, dtype: str, xp=np, eta: float = 0.0) -> dict:
    """The data fields of a `DEISState` but for the step index and history: `coefficients.build` on `grid`, the
    weights in the ring's slot layout, cast to `dtype` (int32 for integer timesteps and the orders). numpy for a
    static grid; jax.numpy for a traced one (see `coefficients.build`)."""
    t = coefficients.build(config, grid, begin_index, xp, eta)
    n, order = t["c"].shape
    # weights[i, slot] = c[i, j] for the lag j = (i - slot) mod order stored in that slot.
    lag = (np.arange(n)[:, None] - np.arange(order)[None, :]) % order
    time_dtype = np.int32 if np.issubdtype(grid.timesteps.dtype, np.integer) else dtype
    return dict(
        timesteps=grid.timesteps.astype(time_dtype),
        sigmas=grid.sigmas.astype(dtype),
        orders=t["orders"].astype(np.int32),
        weights=xp.take_along_axis(t["c"], lag, axis=1).astype(dtype),
        **{k: t[k].astype(dtype) for k in ("alpha_t", "sigma_t", "a", "b", "noise")},
    )


@functools.lru_cache(maxsize=64)
def _tables(config: DEISConfig, num_inference_steps: int, mu: float | None, begin_index: int, dtype: str,
            grid_sigmas: tuple[float, ...] | None, eta: float):
    """Schedule and weights for (config, N, mu, begin_index, custom grid, eta): computed once in float64 on the
    host, cast once to `dtype`, and cached as numpy (not jax arrays, so that a table built while tracing
    one transformation is never reused inside another)."""
    return state_tables(config, spacing.grid(config, num_inference_steps, mu, grid_sigmas), begin_index, dtype,
                        eta=eta)


def _check_begin_index(config: DEISConfig, evaluations: int, begin_index: int) -> None:
    """begin_index counts `step` calls: for rhork, solver_order per step, and it must start a step."""
    per_step = config.evaluations_per_step
    if not (0 <= begin_index < evaluations and begin_index % per_step == 0):
        extra = f" and a multiple of solver_order={per_step}" if per_step > 1 else ""
        raise ValueError(f"begin_index={begin_index!r} is invalid: must be an int in 0..{evaluations - 1}{extra}.")


def _compute_dtype(dtype) -> jnp.dtype:
    """Solver arithmetic is at least float32 (bfloat16/float16 samples are updated in float32)."""
    return jnp.promote_types(jax.dtypes.canonicalize_dtype(dtype), jnp.float32)


STOCHASTIC_SOLVER_TYPES = {"deis": ("logrho", "rhoab", "ipndm", "tab"), "data_prediction": ("logrho",)}


def check_eta(config: DEISConfig, eta) -> float:
    """eta, a Python number in [0, 1] (static: it shapes the tables); eta > 0 needs a multistep solver_type
    (`STOCHASTIC_SOLVER_TYPES`: the data form's SDE weights are closed form for logrho only)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) or not 0 <= eta <= 1:
        raise ValueError(f"eta={eta!r} is invalid: must be a Python number in [0, 1] (0: the probability-flow "
                         "ODE, 1: the reverse SDE).")
    allowed = STOCHASTIC_SOLVER_TYPES[config.algorithm_type]
    if eta > 0 and config.solver_type not in allowed:
        raise ValueError(f"eta={eta!r} is invalid with solver_type={config.solver_type!r} and algorithm_type="
                         f"{config.algorithm_type!r}: stochastic sampling needs solver_type in {allowed}.")
    return float(eta)


def custom_grid(config: DEISConfig, num_inference_steps: int | None, sigmas=None, timesteps=None):
    """(N, grid_sigmas): the step count and the validated custom grid of `sigmas=` or `timesteps=`
    (`spacing.check_sigmas`, `spacing.sigmas_from_timesteps`, at most `spacing.max_custom_steps`), or
    (num_inference_steps, None) without one."""
    if sigmas is None and timesteps is None:
        return num_inference_steps, None
    if sigmas is not None and timesteps is not None:
        raise ValueError("sigmas= and timesteps= are invalid together: pass one custom grid.")
    name, value = ("sigmas", sigmas) if timesteps is None else ("timesteps", timesteps)
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{name}={value!r} is invalid: a custom grid must be concrete (a list, numpy array or "
                         "concrete jax array; it shapes the static tables), not traced by jit, vmap or grad.")
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or not isinstance(
            num_inference_steps, (int, np.integer)) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps={num_inference_steps!r} is invalid with a custom grid: must be "
                         "None or its step count N (an int >= 1).")
    if config.use_dynamic_shifting:
        raise ValueError("sigmas= / timesteps= are invalid with DEISConfig(use_dynamic_shifting=True): a custom "
                         "grid is already shifted; turn dynamic shifting off.")
    grid_sigmas = (spacing.check_sigmas(config, sigmas, num_inference_steps) if timesteps is None
                   else spacing.sigmas_from_timesteps(config, timesteps, num_inference_steps))
    n, limit = len(grid_sigmas) - 1, spacing.max_custom_steps(config, grid_sigmas[-1] == 0)
    if n > limit:
        raise ValueError(f"{name} has {n} steps: at most {limit} fit on this schedule (num_train_timesteps="
                         f"{config.num_train_timesteps}, solver_type={config.solver_type!r}).")
    return n, grid_sigmas


def set_timesteps(
    config: DEISConfig,
    num_inference_steps: int | None,
    shape: Sequence[int],
    mu: float | None = None,
    *,
    dtype=jnp.float32,
    begin_index: int = 0,
    sigmas=None,
    timesteps=None,
    eta: float = 0.0,
) -> DEISState:
    """A fresh state for `num_inference_steps` steps on samples of `shape` (and `dtype`).

    `mu` is diffusers' dynamic-shifting parameter (flow shift = exp(mu)); `begin_index`
    starts the solve part-way through the schedule (img2img), see `set_begin_index`.
    A custom grid replaces the configured one: `sigmas`, N + 1 strictly decreasing noise levels
    in the state's `sigmas` convention (rho for VP, s for flow), the last may be 0; or `timesteps`,
    N strictly decreasing training timesteps (discrete VP schedules). `num_inference_steps`
    must then be N or None. `eta` in [0, 1] makes the steps solve the reverse SDE with that noise
    scale (`check_eta`); `step` then takes the fresh noise as `variance_noise`.
    """
    if not isinstance(config, DEISConfig):
        raise ValueError(f"config={config!r} is invalid: must be a DEISConfig.")
    shape = check_shape(shape)
    n, grid_sigmas = custom_grid(config, num_inference_steps, sigmas, timesteps)
    if grid_sigmas is None:
        n = _check_steps(config, n)
    mu = _check_mu(config, mu)
    cdtype = _compute_dtype(dtype)
    if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)):
        raise ValueError(f"begin_index={begin_index!r} is invalid: must be an int.")
    eta = check_eta(config, eta)
    tables = _tables(config, n, mu, int(begin_index), cdtype.name, grid_sigmas, eta)
    _check_begin_index(config, len(tables["timesteps"]), begin_index)
    return DEISState(
        config=config,
        requested_steps=n,
        mu=mu,
        begin_index=int(begin_index),
        grid_sigmas=grid_sigmas,
        eta=eta,
        step_index=jnp.asarray(begin_index, jnp.int32),
        model_outputs=jnp.zeros((config.solver_order, *shape), cdtype),
        **{k: jnp.asarray(v) for k, v in tables.items()},
    )


def set_begin_index(state: DEISState, begin_index: int) -> DEISState:
    """The same schedule (config, step count, `mu`, custom grid, `eta`) started at step `begin_index`: warm-up
    restarts there, history is cleared."""
    return set_timesteps(
        state.config, state.requested_steps, state.model_outputs.shape[1:], state.mu,
        dtype=state.model_outputs.dtype, begin_index=begin_index, sigmas=state.grid_sigmas, eta=state.eta,
    )


def _threshold(config: DEISConfig, x0: jax.Array) -> jax.Array:
    """Imagen's dynamic thresholding: s = clip(quantile(|x0|, ratio), 1, max); x0 <- clip(x0, -s, s) / s.

    One s per example: the first `config.thresholding_batch_axes` axes index examples, and the
    quantile runs over all the others.
    """
    k = config.thresholding_batch_axes
    if x0.ndim < k + 1:
        raise ValueError(
            f"DEISConfig.thresholding_batch_axes={k} needs samples with at least {k + 1} dims (example axes, "
            f"then the values thresholded together); got sample shape {x0.shape}. Use 0 for one example per sample."
        )
    flat = x0.reshape(*x0.shape[:k], -1)
    s = jnp.quantile(jnp.abs(flat), config.dynamic_thresholding_ratio, axis=-1, keepdims=True)
    s = jnp.clip(s, 1.0, config.sample_max_value)
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def _check_output(state: DEISState, model_output: jax.Array, sample: jax.Array) -> None:
    shape = state.model_outputs.shape[1:]
    if model_output.shape != shape or sample.shape != shape:
        raise ValueError(
            f"model_output.shape={model_output.shape} and sample.shape={sample.shape} must both equal "
            f"the shape given to set_timesteps, {shape}."
        )
    if model_output.dtype != sample.dtype:
        raise ValueError(
            f"model_output.dtype={model_output.dtype} must equal sample.dtype={sample.dtype} "
            f"(cast the model output, e.g. model_fn(x, t).astype(x.dtype))."
        )


def _needs_x0(state: DEISState) -> bool:
    """Whether a step uses x0 (static): the data form, or a closed-form step from rho = inf or to sigma = 0."""
    return state.config.predicts_data or schedule.zero_terminal_snr(state.config) or state.ends_at_zero


def to_x0_eps(config: DEISConfig, model_output: jax.Array, x: jax.Array, alpha_t, sigma_t, s, needs_x0: bool = True):
    """(x0, eps) from a model output m at sample x and noise level (alpha_t, sigma_t; s = the `sigmas` entry):
    x0 = (x - sigma_t m) / alpha_t (epsilon), m (sample), alpha_t x - sigma_t m (v_prediction), x - s m
    (flow_prediction), optionally thresholded; eps = (x - alpha_t x0) / sigma_t. Without thresholding an
    epsilon model's eps is m itself, and x0 is None unless `needs_x0`."""
    if config.prediction_type == "epsilon" and not config.thresholding:
        return ((x - sigma_t * model_output) / alpha_t if needs_x0 else None), model_output
    if config.prediction_type == "epsilon":
        x0 = (x - sigma_t * model_output) / alpha_t
    elif config.prediction_type == "sample":
        x0 = model_output
    elif config.prediction_type == "v_prediction":
        x0 = alpha_t * x - sigma_t * model_output
    else:  # flow_prediction
        sigma_t = s
        x0 = x - sigma_t * model_output
    if config.thresholding:
        x0 = _threshold(config, x0)
    return x0, (x - alpha_t * x0) / sigma_t


def _x0_and_eps(state: DEISState, model_output: jax.Array, sample: jax.Array):
    """(x0, eps) from the model output at the current step (`to_x0_eps`); x0 is None when not needed."""
    _check_output(state, model_output, sample)
    cdtype = state.model_outputs.dtype
    i = state.step_index
    return to_x0_eps(state.config, model_output.astype(cdtype), sample.astype(cdtype), state.alpha_t[i],
                     state.sigma_t[i], state.sigmas[i].astype(cdtype), _needs_x0(state))


def convert_model_output(state: DEISState, model_output: jax.Array, sample: jax.Array) -> jax.Array:
    """The model output as the quantity DEIS extrapolates at the current step: eps, or x0 in the data form.

    x0 = (x - sigma_t m) / alpha_t (epsilon), m (sample), alpha_t x - sigma_t m (v_prediction),
    x - s m (flow_prediction); optional dynamic thresholding of x0; eps = (x - alpha_t x0) / sigma_t.
    For flow_prediction sigma_t is diffusers' `sigmas[i]` = s in both formulas (which for a VP
    schedule is rho, not sigma_t: diffusers' behaviour, kept for parity).
    """
    x0, eps = _x0_and_eps(state, model_output, sample)
    return x0 if state.config.predicts_data else eps


def _like_sample(x: jax.Array, sample: jax.Array) -> jax.Array:
    """`x` (shaped `[*lead, *sample.shape]`) with the sample's sharding on its trailing axes.

    Under an Explicit mesh axis the sharding is part of an array's type, so the history must
    carry the sample's to take its update. Decided at trace time: returns `x` itself when the
    specs already agree (always, without Explicit axes), else reshards it.
    """
    like = jax.typeof(sample).sharding
    spec = PartitionSpec(*(None,) * (x.ndim - sample.ndim), *like.spec)
    if jax.typeof(x).sharding.spec == spec:
        return x
    if not isinstance(sample, jax.core.Tracer):  # eager: the concrete devices of the sample
        like = sample.sharding
    return jax.sharding.reshard(x, like.update(spec=spec))


def with_sample_sharding(state: DEISState, sample: jax.Array) -> DEISState:
    """The state with its history sharded like `sample` (a no-op without Explicit mesh axes).

    `step` does this itself; call it before your own `lax.scan` over `step` when the state was
    made under `jax.set_mesh` (a scan carry must keep its type). `run_loop` calls it.
    """
    return dataclasses.replace(state, model_outputs=_like_sample(state.model_outputs, sample))


def step(state: DEISState, model_output: jax.Array, timestep: jax.Array, sample: jax.Array,
         variance_noise: jax.Array | None = None):
    """One DEIS step: returns (prev_sample, new_state). Pure and jit/scan-able.

    x_{i+1} = a_i x_i + sum_slots weights[i, slot] history[slot] + b_i x0 + noise_i z, the history holding eps
    (or x0 in the data form); b is 0 except on a zero-SNR start and on a final step to sigma = 0. z is
    `variance_noise`, standard normal of the sample's shape, required when the state has eta > 0 (and
    ignored when eta = 0: the ODE step).
    The step index comes from `state.step_index`; `timestep` is accepted for diffusers'
    call signature and is not used to find it. The history and eps take the sample's
    sharding (see `with_sample_sharding`), so an explicitly sharded sample needs no other setup.
    """
    del timestep
    if state.eta and (variance_noise is None or jnp.shape(variance_noise) != sample.shape):
        got = "None" if variance_noise is None else f"shape {jnp.shape(variance_noise)}"
        raise ValueError(f"variance_noise={got} is invalid: a state made with eta={state.eta} needs standard normal "
                         f"noise of the sample's shape {sample.shape} at every step, e.g. "
                         "jax.random.normal(jax.random.fold_in(key, i), sample.shape).")
    i = state.step_index
    x0, eps = _x0_and_eps(state, model_output, sample)
    m = x0 if state.config.predicts_data else eps
    order = state.model_outputs.shape[0]
    history = _like_sample(state.model_outputs, sample)
    history = jax.lax.dynamic_update_index_in_dim(history, _like_sample(m, sample), i % order, 0)
    w = state.weights[i]
    prev = state.a[i] * sample.astype(eps.dtype)
    for slot in range(order):
        prev = prev + w[slot] * history[slot]
    if _needs_x0(state):
        prev = prev + state.b[i] * x0
    if state.eta:
        prev = prev + state.noise[i] * _like_sample(jnp.asarray(variance_noise).astype(eps.dtype), sample)
    new_state = dataclasses.replace(state, step_index=i + 1, model_outputs=history)
    return prev.astype(sample.dtype), new_state


def scale_model_input(state: DEISState, sample: jax.Array, timestep: jax.Array | None = None) -> jax.Array:
    """DEIS needs no input scaling: returns `sample` (kept for diffusers' interface)."""
    del state, timestep
    return sample


def add_noise(state: DEISState, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """alpha_t x0 + sigma_t noise at each timestep t.

    Continuous-time schedules compute alpha_t and sigma_t from t (`schedule.continuous_rho`). On
    discrete schedules each t maps to its index in `state.timesteps` (the second match if it
    repeats, the last step if it is absent), as diffusers does without a begin index.
    """
    t = jnp.atleast_1d(jnp.asarray(timesteps))
    dtype = _compute_dtype(original_samples.dtype)
    if state.config.is_continuous:
        s = schedule.continuous_rho(state.config, t.astype(dtype), xp=jnp)
    else:
        matches = state.timesteps[None, :] == t[:, None]
        count = matches.sum(axis=1)
        first = jnp.argmax(matches, axis=1)
        second = jnp.argmax(jnp.cumsum(matches, axis=1) == 2, axis=1)
        idx = jnp.where(count == 0, state.num_inference_steps - 1, jnp.where(count > 1, second, first))
        s = state.sigmas[idx].astype(dtype)
    alpha_t, sigma_t = alpha_sigma(state.config, s)
    expand = (slice(None),) + (None,) * (original_samples.ndim - 1)
    if t.shape[0] == 1:
        alpha_t, sigma_t = alpha_t[0], sigma_t[0]
    else:
        alpha_t, sigma_t = alpha_t[expand], sigma_t[expand]
    return (alpha_t * original_samples.astype(dtype) + sigma_t * noise.astype(dtype)).astype(original_samples.dtype)
