"""Train the small DigitsClassifier (the feature net of benchmarks/digits_fid.py) on sklearn's 8x8 digits.

Images are scaled to [-1, 1] like the diffusion model's data. A stratified 20% of the 1,797 digits is held
out (never trained on) and its accuracy is reported; training uses random +-1 pixel shifts. Adam with a
cosine learning rate, cross-entropy, ~1 minute on 2 CPU cores.

    python examples/train_digits_classifier.py --epochs 60 --seed 0 --out deis_jax/assets/digits_classifier.npz
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
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deis_jax.models.classifier import DEFAULT_CLASSIFIER_WEIGHTS, DigitsClassifier  # noqa: E402
from deis_jax.models.weights import save_state  # noqa: E402


def digits_with_labels() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as float32 [N, 8, 8, 1] in [-1, 1], and their int labels."""
    d = load_digits()
    return (d.images.astype(np.float32) / 8.0 - 1.0)[..., None], d.target.astype(np.int32)


def random_shift(key: jax.Array, x: jax.Array) -> jax.Array:
    """Shift each image by -1, 0 or +1 pixel in each direction, filling with background (-1)."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (x.shape[0], 2), 0, 3)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), x.shape[1:])  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def accuracy(model: DigitsClassifier, x: np.ndarray, y: np.ndarray) -> float:
    return float(jnp.mean(jnp.argmax(model.logits(jnp.asarray(x)), -1) == jnp.asarray(y)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--out", default=DEFAULT_CLASSIFIER_WEIGHTS)
    return p.parse_args(argv)


def main(argv=None) -> float:
    """Train, save the weights, print and return the held-out accuracy."""
    args = parse_args(argv)
    x, y = digits_with_labels()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=args.test_fraction, stratify=y,
                                              random_state=args.seed)
    key = jax.random.key(args.seed)
    key, init_key = jax.random.split(key)
    model = DigitsClassifier(rngs=nnx.Rngs(init_key))
    graphdef, params = nnx.split(model)
    steps_per_epoch = len(x_tr) // args.batch_size
    total = args.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, steps_per_epoch, total, args.lr * 0.01)
    tx = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = tx.init(params)
    x_tr_j, y_tr_j = jnp.asarray(x_tr), jnp.asarray(y_tr)

    def loss_fn(params, xb, yb):
        logits = nnx.merge(graphdef, params).logits(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def epoch(params, opt_state, key):
        k_perm, k_shift = jax.random.split(key)
        perm = jax.random.permutation(k_perm, len(x_tr))[: steps_per_epoch * args.batch_size]
        xs = random_shift(k_shift, x_tr_j[perm]).reshape(steps_per_epoch, args.batch_size, 8, 8, 1)
        ys = y_tr_j[perm].reshape(steps_per_epoch, args.batch_size)

        def step(carry, batch):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (xs, ys))
        return params, opt_state, losses.mean()

    n_params = sum(v.size for v in jax.tree.leaves(params))
    print(f"DigitsClassifier: {n_params} params; train {len(x_tr)}, held out {len(x_te)}; "
          f"{args.epochs} epochs of {steps_per_epoch} batches of {args.batch_size}")
    start = time.perf_counter()
    for e in range(1, args.epochs + 1):
        key, sub = jax.random.split(key)
        params, opt_state, loss = epoch(params, opt_state, sub)
        if e % 10 == 0 or e == args.epochs:
            held = accuracy(nnx.merge(graphdef, params), x_te, y_te)
            print(f"epoch {e:3d}  loss {float(loss):.4f}  held-out acc {held:.4f}  "
                  f"{time.perf_counter() - start:5.1f}s", flush=True)

    model = nnx.merge(graphdef, params)
    train_acc, test_acc, all_acc = accuracy(model, x_tr, y_tr), accuracy(model, x_te, y_te), accuracy(model, x, y)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_state(model, args.out)
    print(f"accuracy: train {train_acc:.4f}, held-out {test_acc:.4f} ({len(x_te)} digits), all {all_acc:.4f}")
    print(f"saved weights to {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB) "
          f"after {time.perf_counter() - start:.1f}s")
    return test_acc


if __name__ == "__main__":
    main()
