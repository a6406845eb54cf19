"""Learn few-step grids for the bundled digits model and score them on held-out noise against the config's own grid.

For each step count N, solver order and final_sigmas_type (logrho DEIS, DEISConfig()'s linear schedule):
`deis_jax.optimize_sigmas` on a training batch of x_T drawn with numpy's default_rng(--train-seed) (so it shares
no noise with benchmarks/digits_fid.py, which draws jax.random.key(seed) images), then the RMS pixel distance of
the samples from a held-out batch (default_rng(--eval-seed)) to two references from the same noise, both logrho
DEIS of order 3 at 200 steps uniform in log rho from sigma(t=999):
  own: the training target (`learn.reference_sigmas`), ending at sigma(t=0) or, for "zero", on the denoised x0;
  x0:  the "zero" reference for every row, so rows of both final types compare on one scale.
--save-dir writes the row with the lowest x0 distance for each N as <dir>/digits_n{N}.json (`save_grid`).

Run:  python examples/learn_digits_grids.py [--nfe 5 10] [--orders 2 3] [--train-steps 100] [--save-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deis_jax as dj  # noqa: E402
from deis_jax import learn, spacing  # noqa: E402
from deis_jax.models.unet import load_digits_unet  # noqa: E402

SHAPE = (8, 8, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--orders", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--finals", nargs="+", default=list(dj.FINAL_SIGMAS_TYPES))
    parser.add_argument("--algorithm", default="deis", choices=dj.ALGORITHM_TYPES)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=1000)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--reference-steps", type=int, default=200)
    parser.add_argument("--save-dir", default=None)
    args = parser.parse_args()

    from flax import nnx

    graphdef, params = nnx.split(load_digits_unet())

    def model_fn(x, t):
        return nnx.merge(graphdef, params)(x, t)

    train = np.random.default_rng(args.train_seed).standard_normal((args.batch, *SHAPE)).astype(np.float32)
    held = jnp.asarray(np.random.default_rng(args.eval_seed).standard_normal((args.eval_batch, *SHAPE)), jnp.float32)
    references: dict = {}

    def reference(config):
        key = config.final_sigmas_type
        if key not in references:
            ends = learn.grid_ends(config, 1)
            references[key] = dj.sample_from_noise(model_fn, held, config=learn.reference_config(config),
                                                   sigmas=learn.reference_sigmas(config, ends, args.reference_steps))
        return references[key]

    def rms(a, b) -> float:
        return float(jnp.sqrt(jnp.mean((a - b) ** 2)))

    print(f"train: default_rng({args.train_seed}) x {args.batch}; held out: default_rng({args.eval_seed}) x "
          f"{args.eval_batch}; {args.train_steps} Adam steps, lr {args.learning_rate}; jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind}\n")
    print("| N | order | final | grid | RMS to own ref | RMS to x0 ref | train s | sigmas |")
    print("|---|---|---|---|---|---|---|---|")
    best: dict = {}
    for n in args.nfe:
        for order in args.orders:
            for final in args.finals:
                config = dj.DEISConfig(solver_order=order, final_sigmas_type=final, algorithm_type=args.algorithm)
                start = time.perf_counter()
                grid = dj.optimize_sigmas(model_fn, train, config=config, num_inference_steps=n,
                                          reference_steps=args.reference_steps, train_steps=args.train_steps,
                                          learning_rate=args.learning_rate)
                seconds = time.perf_counter() - start
                zero = dataclasses.replace(config, final_sigmas_type="zero")
                for name, sigmas in (("own", spacing.grid(config, n).step_sigmas), ("learned", grid)):
                    x = dj.sample_from_noise(model_fn, held, config=config, sigmas=sigmas)
                    own, x0 = rms(x, reference(config)), rms(x, reference(zero))
                    took = f"{seconds:.0f}" if name == "learned" else ""
                    print(f"| {n} | {order} | {final} | {name} | {own:.4f} | {x0:.4f} | {took} | "
                          f"{np.array2string(np.asarray(sigmas), precision=4, max_line_width=1000)} |", flush=True)
                if n not in best or x0 < best[n][0]:
                    best[n] = (x0, config, grid)
    if args.save_dir:
        for n, (_, config, grid) in best.items():
            path = os.path.join(args.save_dir, f"digits_n{n}.json")
            dj.save_grid(path, config, grid)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
