"""Learned step grids: the N + 1 noise levels of a sampler trained by `jax.grad` through the sampler itself, and
their JSON files (`save_grid` / `load_grid`).

The grid is a function of N free logits z, valid whatever their values: with the fixed ends rho_max and rho_min
(`grid_ends`), step i covers a share w_i of the span L = log rho_max - log rho_min,

    w = MIN_SHARE / N + (1 - MIN_SHARE) softmax(z),   log rho_i = log rho_max - L (w_0 + ... + w_{i-1}),

so rho_0 = rho_max, rho_N = rho_min, and every step is at least MIN_SHARE / N of L long (strictly decreasing
even in float32 at extreme logits). With final_sigmas_type="zero" the last entry is 0 instead of rho_min, so
rho_{N-1} (which stays above rho_min) is learned too. Sigmas are in the state's convention (rho for VP,
s = rho / (1 + rho) for flow).

Under the loss the grid stays traced: `grid_state` builds the `DEISState` tables with the same
`coefficients.build` as `set_timesteps` (xp=jax.numpy) and the usual `run_loop` runs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax import schedule, solver, spacing
from deis_jax.config import DEISConfig
from deis_jax.sampling import ModelFn, run_loop, sample_from_noise

MIN_SHARE = 0.01  # every step spans at least 1% of a uniform step (MIN_SHARE / N of the log-rho span)
LEARNABLE_SOLVER_TYPES = ("logrho", "rhoab", "ipndm")
GRID_FORMAT, GRID_VERSION = "deis_jax.grid", 1
GRIDS_DIR = os.path.join(os.path.dirname(__file__), "grids")  # the grids shipped with the package


def check_learnable(config: DEISConfig) -> None:
    """ValueError unless the loss of `config`'s sampler is differentiable in its grid."""
    if not isinstance(config, DEISConfig):
        raise ValueError(f"config={config!r} is invalid: must be a DEISConfig.")
    if config.solver_type not in LEARNABLE_SOLVER_TYPES:
        raise ValueError(f"DEISConfig.solver_type={config.solver_type!r} is invalid for a learned grid: must be one "
                         f"of {LEARNABLE_SOLVER_TYPES} (tab's weights are a host-side quadrature; rhork's stages "
                         "are not built under tracing).")
    if not spacing.keeps_custom_sigmas(config):
        raise ValueError(f"DEISConfig.solver_type={config.solver_type!r} is invalid for a learned grid on a discrete "
                         "VP schedule: it rounds a custom grid to training timesteps and their sigmas, so the loss "
                         "is piecewise constant in the grid (no gradient); use 'logrho', or a continuous or flow "
                         "schedule.")
    if config.use_dynamic_shifting:
        raise ValueError("DEISConfig.use_dynamic_shifting=True is invalid for a learned grid (a custom grid is "
                         "already shifted); turn it off.")
    if schedule.zero_terminal_snr(config):
        raise ValueError("DEISConfig.trained_betas with a last beta of 1 (zero terminal SNR) is invalid for a learned "
                         "grid: its first noise level is infinite.")


def _sigma_min_grid(config: DEISConfig, num_inference_steps: int) -> np.ndarray:
    """The config's own N + 1 sigmas as they end with final_sigmas_type="sigma_min" (a learned grid's start)."""
    plain = dataclasses.replace(config, final_sigmas_type="sigma_min")
    return spacing.timesteps_and_sigmas(plain, num_inference_steps)[1]


def grid_ends(config: DEISConfig, num_inference_steps: int) -> tuple[float, float]:
    """(first, last nonzero) sigma of a learned grid: those of the config's own N-step grid (with
    final_sigmas_type="sigma_min"), as `spacing.check_sigmas` places them (it moves ends within 1e-3 of
    the schedule's range onto it)."""
    s = _sigma_min_grid(config, num_inference_steps)
    first, last = spacing.check_sigmas(config, [s[0], s[-1]] + [0.0] * (config.final_sigmas_type == "zero"), None)[:2]
    return first, last


def _softmax(z, xp):
    e = xp.exp(z - xp.max(z))
    return e / xp.sum(e)


def sigmas_from_logits(config: DEISConfig, logits, ends: tuple[float, float], xp=jnp):
    """The grid [N + 1] of N logits (module docstring), in the dtype of `logits`; numpy or jax.numpy."""
    n = logits.shape[0]
    s_max, s_min = ends
    log_max, log_min = (math.log(schedule.rho_from_sigma(config, s)) for s in ends)
    share = MIN_SHARE / n + (1 - MIN_SHARE) * _softmax(logits, xp)
    inner = schedule.sigma_from_rho(config, xp.exp(log_max - (log_max - log_min) * xp.cumsum(share)[:-1]))
    last = 0.0 if config.final_sigmas_type == "zero" else s_min
    return xp.concatenate([xp.asarray([s_max], logits.dtype), inner, xp.asarray([last], logits.dtype)])


def initial_logits(config: DEISConfig, num_inference_steps: int) -> np.ndarray:
    """Logits (float64) whose grid is the config's own N-step grid with final_sigmas_type="sigma_min", its last
    entry 0 with "zero" (for spacing grids that is the config's own "zero" grid; a sigma grid's own "zero" grid
    has N levels then 0 instead); steps shorter than MIN_SHARE / N of the span, such as the repeated last sigma
    of flow grids, lengthened to it."""
    n = num_inference_steps
    log_rho = np.log(schedule.rho_from_sigma(config, _sigma_min_grid(config, n)))
    share = -np.diff(log_rho) / (log_rho[0] - log_rho[-1])
    return np.log(np.maximum(share - MIN_SHARE / n, 1e-2 * MIN_SHARE / n))


def grid_state(config: DEISConfig, sigmas: jax.Array, shape, dtype=jnp.float32) -> solver.DEISState:
    """A fresh `DEISState` on a grid given as a (possibly traced) jnp array of N + 1 sigmas: `set_timesteps`'s
    tables built in jnp, so `jax.grad` reaches them. Same rules as `set_timesteps(..., sigmas=)` (the grid
    must be valid: finite, strictly decreasing, ending at 0 exactly when final_sigmas_type="zero"). The
    model's times are `spacing.custom_model_times`: on discrete and flow schedules whole numbers, but as
    floats whose gradient is that of the unrounded time (t(sigma) or s N; a straight-through estimate of
    the rounded time's effect), so the model must take float times and be differentiable in them."""
    check_learnable(config)
    shape = solver.check_shape(shape)
    times = spacing.custom_model_times(config, sigmas[:-1], jnp, whole=False)
    if not config.is_continuous:  # the whole-number time's value, the unrounded time's gradient (straight-through)
        times = times + jax.lax.stop_gradient(spacing.custom_model_times(config, sigmas[:-1], jnp) - times)
    cdtype = solver._compute_dtype(dtype)
    tables = solver.state_tables(config, spacing.Grid(times, sigmas, sigmas), 0, cdtype.name, xp=jnp)
    return solver.DEISState(
        config=config, requested_steps=sigmas.shape[0] - 1, mu=None, begin_index=0, grid_sigmas=None, eta=0.0,
        step_index=jnp.zeros((), jnp.int32), model_outputs=jnp.zeros((config.solver_order, *shape), cdtype),
        **{k: jnp.asarray(v) for k, v in tables.items()})


def grid_loss(model_fn: ModelFn, noise: jax.Array, reference: jax.Array, config: DEISConfig, sigmas: jax.Array):
    """mean((x_N - reference)^2) over every entry, x_N the sample from `noise` on the grid `sigmas` (`grid_state`,
    `run_loop`, unrolled: on CPU a convolutional model's gradient runs several times faster): differentiable
    in `sigmas`."""
    x = run_loop(model_fn, noise, grid_state(config, sigmas, noise.shape, noise.dtype), unroll=True)
    return jnp.mean((x - reference).astype(sigmas.dtype) ** 2)


def reference_config(config: DEISConfig) -> DEISConfig:
    """The config of the reference solution: logrho DEIS of order 3, all else as `config`."""
    return dataclasses.replace(config, solver_type="logrho", solver_order=3)


def reference_sigmas(config: DEISConfig, ends: tuple[float, float], reference_steps: int) -> np.ndarray:
    """The reference grid: `reference_steps` steps uniform in log rho between the ends (the last to 0 with
    final_sigmas_type="zero")."""
    rho_max, rho_min = (schedule.rho_from_sigma(config, s) for s in ends)
    zero = config.final_sigmas_type == "zero"
    s = schedule.sigma_from_rho(config, np.geomspace(rho_max, rho_min, reference_steps + 1 - zero))
    s[0], s[-1] = ends
    return np.append(s, 0.0) if zero else s


def _check_number(name: str, value, minimum: float, integer: bool):
    """value as an int >= minimum, or as a finite float > minimum; else ValueError naming it."""
    kind = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, kind) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    if not ok or value < minimum or (not integer and value == minimum):
        want = f"an int >= {minimum}" if integer else f"a finite number > {minimum}"
        raise ValueError(f"{name}={value!r} is invalid: must be {want}.")
    return int(value) if integer else float(value)


def optimize_sigmas(
    model_fn: ModelFn,
    noise,
    *,
    config: DEISConfig,
    num_inference_steps: int,
    reference_steps: int = 200,
    train_steps: int = 100,
    learning_rate: float = 0.02,
    progress: bool = False,
) -> np.ndarray:
    """Train an N-step grid for `config`'s sampler so that its samples from `noise` match a reference solution.

    loss(z) = mean over `noise` and pixels of (x_N(z) - x_ref)^2: x_N is the N-step sample on the grid
    `sigmas_from_logits(z)`; x_ref, computed once, the sample from the same noise of logrho DEIS of order 3
    (`reference_config`) on `reference_sigmas` (`reference_steps` steps uniform in log rho between the same
    ends). z starts at the config's own grid (`initial_logits`) and takes `train_steps` full-batch Adam steps
    (optax) of `learning_rate` on jax.grad of the loss through the sampler. The ends stay those of the
    config's grid (`grid_ends`); with final_sigmas_type="zero" the grid ends at 0 and its second-to-last
    noise level is learned too.

    noise: [batch, *sample shape], the training batch of x_T; its dtype is the compute dtype (float32 is
        fast; float64 needs jax_enable_x64). Evaluate the grid on other noise.
    model_fn(x, t): as for `sample_from_noise`; on discrete and flow schedules it gets whole-number float
        times during training and must be differentiable in them (`grid_state`).
    solver_type: logrho (any schedule), rhoab or ipndm (continuous or flow schedules); either algorithm_type.
    progress: a tqdm bar over the train steps, showing the loss.
    Returns the grid [N + 1] (float64, the state's sigma convention), ready for `sample_from_noise(...,
    sigmas=grid)` and `save_grid`. Needs optax.
    """
    import optax
    from tqdm.auto import tqdm

    check_learnable(config)
    n = _check_number("num_inference_steps", num_inference_steps, 2, True)
    if n > spacing.max_inference_steps(config):
        raise ValueError(f"num_inference_steps={n} is invalid: must be at most {spacing.max_inference_steps(config)} "
                         "for this config.")
    reference_steps = _check_number("reference_steps", reference_steps, n + 1, True)
    train_steps = _check_number("train_steps", train_steps, 1, True)
    learning_rate = _check_number("learning_rate", learning_rate, 0, False)
    noise = jnp.asarray(noise)
    if noise.ndim < 1 or noise.size == 0 or not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(f"noise has shape {noise.shape} and dtype {noise.dtype}: it must be a non-empty float "
                         "array [batch, *sample shape] of x_T.")

    ends = grid_ends(config, n)
    reference = sample_from_noise(model_fn, noise, config=reference_config(config),
                                  sigmas=reference_sigmas(config, ends, reference_steps))
    optimizer = optax.adam(learning_rate)

    def loss_fn(logits, noise, reference):
        return grid_loss(model_fn, noise, reference, config, sigmas_from_logits(config, logits, ends))

    @jax.jit
    def update(logits, opt_state, noise, reference):
        loss, grad = jax.value_and_grad(loss_fn)(logits, noise, reference)
        updates, opt_state = optimizer.update(grad, opt_state)
        return optax.apply_updates(logits, updates), opt_state, loss

    logits = jnp.asarray(initial_logits(config, n), solver._compute_dtype(noise.dtype))
    opt_state = optimizer.init(logits)
    bar = tqdm(range(train_steps), desc="optimize_sigmas", unit="step", disable=not progress)
    for _ in bar:
        logits, opt_state, loss = update(logits, opt_state, noise, reference)
        if progress:
            bar.set_postfix(loss=f"{float(loss):.3e}")
    return sigmas_from_logits(config, np.asarray(logits, np.float64), ends, xp=np)


def save_grid(path: str | os.PathLike, config: DEISConfig, sigmas) -> None:
    """Write `config` (every field) and its grid `sigmas` (validated as `set_timesteps(..., sigmas=)` does) as
    JSON: {"format": "deis_jax.grid", "version": 1, "config": {...}, "sigmas": [...]}."""
    if not isinstance(config, DEISConfig):
        raise ValueError(f"config={config!r} is invalid: must be a DEISConfig.")
    grid = spacing.check_sigmas(config, sigmas, None)
    fields = dataclasses.asdict(config)  # trained_betas: a tuple (a JSON list) or None (null)
    with open(path, "w") as f:
        json.dump({"format": GRID_FORMAT, "version": GRID_VERSION, "config": fields, "sigmas": list(grid)}, f,
                  indent=1, allow_nan=False)
        f.write("\n")


def load_grid(path: str | os.PathLike) -> tuple[DEISConfig, np.ndarray]:
    """(config, sigmas [N + 1] float64) from a `save_grid` file; ValueError for another format or version,
    unknown config fields or an invalid grid."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != GRID_FORMAT or data.get("version") != GRID_VERSION:
        found = (data.get("format"), data.get("version")) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{os.fspath(path)!r} is not a grid file of format {GRID_FORMAT!r} version {GRID_VERSION} "
                         f"(found {found}).")
    fields = data.get("config")
    if not isinstance(fields, dict) or set(fields) - {f.name for f in dataclasses.fields(DEISConfig)}:
        raise ValueError(f"{os.fspath(path)!r} has invalid config={fields!r}: must be a dict of DEISConfig fields.")
    config = DEISConfig(**fields)
    return config, np.asarray(spacing.check_sigmas(config, data.get("sigmas"), None))
