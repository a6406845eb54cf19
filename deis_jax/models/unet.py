"""A small time-conditioned UNet (Flax NNX) for 8x8x1 images, and its .npz weight I/O.

Layout: stem conv -> ResBlock @8x8 (skip) -> stride-2 conv -> 2 ResBlocks @4x4 ->
nearest upsample + conv -> concat skip -> ResBlock @8x8 -> GroupNorm/SiLU/conv head.
Each ResBlock adds a projection of the sinusoidal timestep embedding.
Weights are stored as a flat dict "path/to/param" -> float32 array.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from deis_jax.models.weights import load_state

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits_unet.npz")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos, sin] of timesteps t (shape [B] or scalar) -> [B, dim]."""
    t = jnp.atleast_1d(jnp.asarray(t, jnp.float32))
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-Conv x2 with an additive time projection and a residual path."""

    def __init__(self, cin: int, cout: int, temb_dim: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(cin, num_groups=8, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
        self.temb = nnx.Linear(temb_dim, cout, rngs=rngs)
        self.norm2 = nnx.GroupNorm(cout, num_groups=8, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.skip = nnx.Conv(cin, cout, (1, 1), rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class DigitsUNet(nnx.Module):
    """eps-prediction UNet for [B, 8, 8, 1] inputs; `model(x, t)` with t a scalar or [B] timesteps."""

    def __init__(self, ch: int = 32, temb_dim: int = 128, *, rngs: nnx.Rngs):
        self.temb_dim = temb_dim
        self.temb1 = nnx.Linear(temb_dim, temb_dim, rngs=rngs)
        self.temb2 = nnx.Linear(temb_dim, temb_dim, rngs=rngs)
        self.stem = nnx.Conv(1, ch, (3, 3), rngs=rngs)
        self.enc = ResBlock(ch, ch, temb_dim, rngs=rngs)
        self.down = nnx.Conv(ch, 2 * ch, (3, 3), strides=(2, 2), rngs=rngs)
        self.mid1 = ResBlock(2 * ch, 2 * ch, temb_dim, rngs=rngs)
        self.mid2 = ResBlock(2 * ch, 2 * ch, temb_dim, rngs=rngs)
        self.up = nnx.Conv(2 * ch, ch, (3, 3), rngs=rngs)
        self.dec = ResBlock(2 * ch, ch, temb_dim, rngs=rngs)
        self.norm_out = nnx.GroupNorm(ch, num_groups=8, rngs=rngs)
        self.head = nnx.Conv(ch, 1, (3, 3), kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        temb = timestep_embedding(t, self.temb_dim)
        temb = self.temb2(nnx.silu(self.temb1(temb)))
        h = self.stem(x)
        skip = self.enc(h, temb)
        h = self.down(skip)
        h = self.mid2(self.mid1(h, temb), temb)
        h = jax.image.resize(h, (b, *skip.shape[1:3], h.shape[-1]), "nearest")
        h = self.up(h)
        h = self.dec(jnp.concatenate([h, skip], axis=-1), temb)
        return self.head(nnx.silu(self.norm_out(h)))


def load_digits_unet(path: str | None = None) -> DigitsUNet:
    """Rebuild a `DigitsUNet` with the parameters saved by `save_state` (default: the packaged weights)."""
    return load_state(lambda: DigitsUNet(rngs=nnx.Rngs(0)), DEFAULT_WEIGHTS if path is None else path)
