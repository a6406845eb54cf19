"""Classifier-free guidance as a model wrapper: both branches in one batched model call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def rescale_guidance(guided: jax.Array, cond: jax.Array, guidance_rescale: float) -> jax.Array:
    """Lin et al. (2023), eq. 16: match the per-sample std of the conditional output, then blend.

    out = phi * guided * std(cond) / std(guided) + (1 - phi) * guided, std over all but the batch axis.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    return guidance_rescale * guided * (std_cond / std_guided) + (1.0 - guidance_rescale) * guided


def classifier_free_guidance(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> Callable[[jax.Array, jax.Array, Any, Any], jax.Array]:
    """Wrap `model_fn(x, t, cond)` into `guided(x, t, cond, uncond)`.

    The unconditional and conditional branches run as one model call on a batch of twice the
    size ([uncond; cond] along axis 0 of x and of every leaf of the conditioning), then
    out = u + guidance_scale * (c - u), optionally rescaled (`guidance_rescale` in [0, 1]).
    Close over the conditioning to get a sampler model: `lambda x, t: guided(x, t, cond, uncond)`.
    """
    if not guidance_rescale >= 0.0 or not guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale!r} is invalid: must be in [0, 1].")

    def guided(x, t, cond, uncond):
        both = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
        out = model_fn(jnp.concatenate([x, x], axis=0), t, both)
        out_uncond, out_cond = jnp.split(out, 2, axis=0)
        guided_out = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0.0:
            guided_out = rescale_guidance(guided_out, out_cond, guidance_rescale)
        return guided_out

    return guided
