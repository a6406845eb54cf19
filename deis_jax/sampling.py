"""The sampling loop: `set_timesteps` once, then one `jax.lax.scan` over `step`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from deis_jax.config import DEISConfig
from deis_jax.schedule import alpha_sigma
from deis_jax.solver import (
    DEISState,
    check_shape,
    custom_grid,
    scale_model_input,
    set_timesteps,
    step,
    with_sample_sharding,
)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
DEFAULT_INFERENCE_STEPS = 20  # the step count of a named grid when none is given


def _step_count(num_inference_steps: int | None, sigmas, timesteps) -> int | None:
    """num_inference_steps, or DEFAULT_INFERENCE_STEPS when neither it nor a custom grid is given."""
    if num_inference_steps is None and sigmas is None and timesteps is None:
        return DEFAULT_INFERENCE_STEPS
    return num_inference_steps


# What `check_finite=True` raises: checkify's error type (a ValueError), under this name. An eager
# call raises it directly; under jit, wrap the function in `checkify.checkify` and `err.throw()`
# raises it (plain jit refuses an unfunctionalized check when it compiles). It is raised for any
# failed checkify check, not only ours.
NonFiniteError = checkify.JaxRuntimeError


def _progress_callback(total: int):
    """A host callback that advances a tqdm bar by one step per call and closes it at the end."""
    from tqdm.auto import tqdm

    bar = {}

    def update(_):
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="DEIS", unit="step")
        bar["bar"].update(1)
        if bar["bar"].n >= total:
            bar.pop("bar").close()

    return update


def _check_finite(bad: jax.Array, timesteps: jax.Array) -> None:
    """`check_finite`: a checkify check naming the earliest step whose model output or sample is
    non-finite (the model output on a tie); bad = [first bad output step, first bad sample step], -1 if none."""
    output_first = (bad[0] >= 0) & ((bad[1] < 0) | (bad[0] <= bad[1]))
    sample_first = (bad[1] >= 0) & ~output_first
    for what, failed, i in (("model output", output_first, bad[0]), ("sample", sample_first, bad[1])):
        checkify.check(~failed, f"the {what} became non-finite (NaN or inf) at step {{}} (timestep {{}})",
                       i, timesteps[i])


def _check_fresh(state: DEISState) -> None:
    """run_loop starts at state.begin_index: reject a state that has already taken steps (when known)."""
    try:
        taken = int(state.step_index) - state.begin_index
    except jax.errors.ConcretizationTypeError:  # traced state: its step index is not known here
        return
    if taken != 0:
        raise ValueError(f"state.step_index={int(state.step_index)} is invalid for run_loop: the state must be "
                         f"fresh (step_index == begin_index={state.begin_index}); it has taken {taken} steps. "
                         "Start from set_timesteps or set_begin_index.")


def _check_key(state: DEISState, key) -> None:
    """A stochastic state (eta > 0) needs a PRNG key for its per-step noise."""
    if state.eta and key is None:
        raise ValueError(f"key=None is invalid with eta={state.eta}: stochastic sampling draws its per-step noise "
                         "from a PRNG key (pass key=jax.random.key(...)).")


def _normal_like(key: jax.Array, x: jax.Array, dtype) -> jax.Array:
    """Standard normal noise of x's shape in `dtype`, drawn with x's sharding when that is explicit."""
    sharding = jax.typeof(x).sharding
    explicit = any(axis is not None for axis in sharding.spec)
    return jax.random.normal(key, x.shape, dtype, out_sharding=sharding if explicit else None)


def run_loop(
    model_fn: ModelFn,
    x: jax.Array,
    state: DEISState,
    *,
    key: jax.Array | None = None,
    progress: bool = False,
    check_finite: bool = False,
    remat: bool = False,
    unroll: int | bool = 1,
) -> jax.Array:
    """Run the steps of a fresh `state` on x as one lax.scan: steps `state.begin_index`..N-1
    (`set_timesteps(..., begin_index=)` or `set_begin_index` decide where the solve starts).

    key: required when `state.eta > 0`: step i's noise is N(0, I) from `jax.random.fold_in(key, i)`.

    progress: a tqdm bar updated from inside the compiled loop (host callback).
    check_finite: raise `NonFiniteError` naming the first non-finite step (a checkify check after the
                  loop: under jit, wrap the call in `jax.experimental.checkify.checkify`).
    remat: `jax.checkpoint` the step, so reverse-mode memory does not hold every step's activations.
    unroll: `lax.scan`'s unroll; True unrolls every step (longer compiles; on CPU, XLA runs a convolutional
            model's gradient inside a loop several times slower than unrolled).
    """
    _check_fresh(state)
    _check_key(state, key)
    timesteps = state.timesteps[state.begin_index:]
    update = _progress_callback(len(timesteps)) if progress else None

    def body(carry, t):
        x, state, bad = carry
        model_output = model_fn(scale_model_input(state, x, t), t)
        z = None
        if state.eta:
            z = _normal_like(jax.random.fold_in(cast(jax.Array, key), state.step_index), x,  # key checked above
                             state.model_outputs.dtype)
        new_x, new_state = step(state, model_output, t, x, z)
        if update is not None:
            jax.debug.callback(update, state.step_index)
        if check_finite:
            i = state.step_index
            flags = jnp.stack([~jnp.all(jnp.isfinite(model_output)), ~jnp.all(jnp.isfinite(new_x))])
            bad = jnp.where((bad < 0) & flags, i, bad)
        return (new_x, new_state, bad), None

    if remat:
        body = jax.checkpoint(body)
    # A scan carry keeps its type: give the history the sample's sharding before the loop.
    state = with_sample_sharding(state, x)
    bad = jnp.full((2,), -1, jnp.int32)
    (x, _, bad), _ = jax.lax.scan(body, (x, state, bad), timesteps, unroll=unroll)
    if check_finite:
        _check_finite(bad, state.timesteps)
    return x


def sample_from_noise(
    model_fn: ModelFn,
    noise: jax.Array,
    *,
    config: DEISConfig = DEISConfig(),
    num_inference_steps: int | None = None,
    mu: float | None = None,
    begin_index: int = 0,
    sigmas=None,
    timesteps=None,
    eta: float = 0.0,
    key: jax.Array | None = None,
    progress: bool = False,
    check_finite: bool = False,
    remat: bool = False,
) -> jax.Array:
    """Solve the probability-flow ODE from x_T = `state.init_noise_sigma` * `noise` (1, or sigma_0 for VE) with DEIS;
    returns x_0 in `noise.dtype`. With `eta` > 0, the reverse SDE with noise scale eta instead
    (`set_timesteps`), its per-step noise drawn from `key` (`run_loop`).

    `model_fn(x, t)` gets the sample and the timestep (a scalar array) and returns the model
    output. The loop is one `lax.scan`, so its body is traced once. With `begin_index` the
    given array is the sample at step `begin_index` (img2img); `sigmas` / `timesteps` give a
    custom grid (`set_timesteps`; `num_inference_steps` must then be its N or None); see
    `run_loop` for the flags.
    """
    noise = jnp.asarray(noise)
    state = set_timesteps(config, _step_count(num_inference_steps, sigmas, timesteps), noise.shape, mu,
                          dtype=noise.dtype, begin_index=begin_index, sigmas=sigmas, timesteps=timesteps, eta=eta)
    _check_key(state, key)
    # x_T = init_noise_sigma noise, in the noise's dtype; a later start (begin_index > 0) is the sample itself.
    x = (noise * state.init_noise_sigma).astype(noise.dtype) if begin_index == 0 else noise
    return run_loop(model_fn, x, state, key=key, progress=progress,
                    check_finite=check_finite, remat=remat)


def sample(
    model_fn: ModelFn,
    key: jax.Array,
    shape: Sequence[int],
    *,
    config: DEISConfig = DEISConfig(),
    num_inference_steps: int | None = None,
    dtype=jnp.float32,
    mu: float | None = None,
    sigmas=None,
    timesteps=None,
    eta: float = 0.0,
    progress: bool = False,
    check_finite: bool = False,
    remat: bool = False,
) -> jax.Array:
    """Draw x_T ~ N(0, I) of `shape` and `dtype` from `key`, then `sample_from_noise` (with `eta` > 0, the
    per-step noise of step i from `jax.random.fold_in(key, i)`)."""
    noise = jax.random.normal(key, check_shape(shape), dtype)
    return sample_from_noise(model_fn, noise, config=config, num_inference_steps=num_inference_steps, mu=mu,
                             sigmas=sigmas, timesteps=timesteps, eta=eta, key=key, progress=progress,
                             check_finite=check_finite, remat=remat)


def strength_begin_index(config: DEISConfig, num_inference_steps: int, strength: float) -> int:
    """diffusers' img2img rule: skip the first N - int(N * strength) steps (of model evaluations
    per step: 1, or solver_order for rhork)."""
    if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength={strength!r} is invalid: must be a number in (0, 1].")
    init = min(int(num_inference_steps * strength), num_inference_steps)
    if init == 0:
        raise ValueError(f"strength={strength!r} is invalid: N * strength rounds down to 0 steps for "
                         f"num_inference_steps={num_inference_steps}.")
    return (num_inference_steps - init) * config.evaluations_per_step


def img2img(
    model_fn: ModelFn,
    image: jax.Array,
    noise: jax.Array,
    *,
    strength: float,
    config: DEISConfig = DEISConfig(),
    num_inference_steps: int | None = None,
    mu: float | None = None,
    sigmas=None,
    timesteps=None,
    eta: float = 0.0,
    key: jax.Array | None = None,
    progress: bool = False,
    check_finite: bool = False,
) -> jax.Array:
    """Noise `image` to the step where a `strength` fraction of the schedule remains, then solve
    from there (diffusers' img2img semantics: `set_begin_index`, `add_noise` at that timestep);
    `sigmas` / `timesteps` give a custom grid, `eta` and `key` the SDE, as in `sample_from_noise`."""
    image = jnp.asarray(image)
    n, grid_sigmas = custom_grid(config, _step_count(num_inference_steps, sigmas, timesteps), sigmas, timesteps)
    begin = strength_begin_index(config, n, strength)
    state = set_timesteps(config, n, image.shape, mu, dtype=image.dtype, begin_index=begin, sigmas=grid_sigmas,
                          eta=eta)
    _check_key(state, key)
    alpha_t, sigma_t = alpha_sigma(config, state.sigmas[begin])  # diffusers: sigmas[begin_index]
    x = (alpha_t * image + sigma_t * jnp.asarray(noise, state.sigmas.dtype)).astype(image.dtype)
    return run_loop(model_fn, x, state, key=key, progress=progress, check_finite=check_finite)
