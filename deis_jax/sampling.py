"""The sampling loop: `set_timesteps` once, then one `jax.lax.scan` over `step`."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from deis_jax.config import DEISConfig
from deis_jax.solver import check_shape, scale_model_input, set_timesteps, step

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def sample_from_noise(
    model_fn: ModelFn,
    noise: jax.Array,
    *,
    config: DEISConfig = DEISConfig(),
    num_inference_steps: int = 20,
    mu: float | None = None,
) -> jax.Array:
    """Solve the probability-flow ODE from `noise` (x_T) with DEIS; returns x_0 in `noise.dtype`.

    `model_fn(x, t)` gets the sample and the timestep (a scalar array) and returns the
    model output. The loop is one `lax.scan`, so its body is traced once.
    """
    noise = jnp.asarray(noise)
    state = set_timesteps(config, num_inference_steps, noise.shape, mu, dtype=noise.dtype)

    def body(carry, t):
        x, state = carry
        model_output = model_fn(scale_model_input(state, x, t), t)
        return step(state, model_output, t, x), None

    (x, _), _ = jax.lax.scan(body, (noise * state.init_noise_sigma, state), state.timesteps)
    return x


def sample(
    model_fn: ModelFn,
    key: jax.Array,
    shape: Sequence[int],
    *,
    config: DEISConfig = DEISConfig(),
    num_inference_steps: int = 20,
    dtype=jnp.float32,
    mu: float | None = None,
) -> jax.Array:
    """Draw x_T ~ N(0, I) of `shape` and `dtype` from `key`, then `sample_from_noise`."""
    noise = jax.random.normal(key, check_shape(shape), dtype)
    return sample_from_noise(model_fn, noise, config=config, num_inference_steps=num_inference_steps, mu=mu)
