"""Train the small DigitsUNet on sklearn's 8x8 digits with the DDPM epsilon loss.

The noise schedule is `DEISConfig()`'s (linear betas 1e-4..0.02, 1000 steps), so the
weights can be sampled with `deis_jax.sample`. An EMA of the parameters is what gets saved.

    python examples/train_digits.py --steps 6000 --batch-size 64 --seed 0 --out deis_jax/assets/digits_unet.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deis_jax  # noqa: E402
from deis_jax.models.unet import DEFAULT_WEIGHTS, DigitsUNet  # noqa: E402
from deis_jax.models.weights import save_state  # noqa: E402


def digits_dataset() -> np.ndarray:
    """All 1797 sklearn digits as float32 [N, 8, 8, 1] in [-1, 1]."""
    images = load_digits().images.astype(np.float32)
    return (images / 8.0 - 1.0)[..., None]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.9995, help="EMA decay of the saved weights")
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--out", default=DEFAULT_WEIGHTS)
    return p.parse_args(argv)


def main(argv=None) -> float:
    args = parse_args(argv)
    data = jnp.asarray(digits_dataset())
    ac = jnp.asarray(deis_jax.schedule.alphas_cumprod(deis_jax.DEISConfig()))
    n_train = ac.shape[0]

    key = jax.random.key(args.seed)
    key, init_key = jax.random.split(key)
    model = DigitsUNet(rngs=nnx.Rngs(init_key))
    graphdef, params = nnx.split(model)
    warmup = min(200, args.steps // 10 + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    opt_state = tx.init(params)
    ema = params

    def loss_fn(params, key):
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_idx, (args.batch_size,), 0, data.shape[0])]
        t = jax.random.randint(k_t, (args.batch_size,), 0, n_train)
        eps = jax.random.normal(k_eps, x0.shape)
        a = ac[t][:, None, None, None]
        xt = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
        pred = nnx.merge(graphdef, params)(xt, t)
        return jnp.mean((pred - eps) ** 2)

    @jax.jit
    def train_step(params, opt_state, ema, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: args.ema * e + (1.0 - args.ema) * p, ema, params)
        return params, opt_state, ema, loss

    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"DigitsUNet: {n_params} params; {data.shape[0]} digits; {args.steps} steps of batch {args.batch_size}")
    start, running = time.perf_counter(), []
    for i in range(1, args.steps + 1):
        key, sub = jax.random.split(key)
        params, opt_state, ema, loss = train_step(params, opt_state, ema, sub)
        running.append(loss)
        if i % args.log_every == 0 or i == args.steps:
            mean = float(jnp.mean(jnp.stack(running)))
            running = []
            print(f"step {i:6d}  loss {mean:.4f}  {time.perf_counter() - start:6.1f}s", flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_state(nnx.merge(graphdef, ema), args.out)
    print(f"saved EMA weights to {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) "
          f"after {time.perf_counter() - start:.1f}s")
    return mean


if __name__ == "__main__":
    main()
