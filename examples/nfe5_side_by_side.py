"""The README's picture: the same 16 digits' noise sampled at NFE 5 by three samplers, side by side.

Left to right: deis_jax's best hand grid on the digits at NFE 5 (logrho o3, trailing, data-prediction form, final
step to 0, lower_order_final=False; benchmarks/low_nfe.py), the learned 5-step grid shipped in
deis_jax/grids/digits_n5.json, and diffusers' DPM-Solver++(2M) (final step to 0, linspace).

Run:  python examples/nfe5_side_by_side.py [--out examples/nfe5_side_by_side.png] [--seed 3]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import low_nfe  # noqa: E402

import deis_jax  # noqa: E402
from deis_jax import demo  # noqa: E402

NFE, NUM = 5, 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "examples", "nfe5_side_by_side.png"))
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()
    unet, _ = low_nfe.load_models()
    noise = np.asarray(jax.random.normal(jax.random.key(args.seed), (NUM, demo.IMAGE_SIZE, demo.IMAGE_SIZE, 1)))
    hand = low_nfe.deis_row("logrho", 3, "trailing", False, "data")
    learned_config, learned_sigmas = deis_jax.load_grid(os.path.join(ROOT, "deis_jax", "grids", "digits_n5.json"))
    dpm = next(r for r in low_nfe.diffusers_rows() if r.name == "DPM-Solver++(2M) linspace")
    panels = [low_nfe.deis_generator(unet, hand.config, NFE)(noise),
              low_nfe.deis_generator(unet, learned_config, None, tuple(learned_sigmas))(noise),
              low_nfe.diffusers_generator(unet, dpm, NFE)(noise)]
    grids = [demo.grid_image(x) for x in panels]
    gap = np.full((grids[0].shape[0], 12), 255, np.uint8)
    demo.write_png(args.out, np.concatenate([grids[0], gap, grids[1], gap, grids[2]], axis=1))
    print(f"wrote {args.out}: {hand.name} | learned digits_n5.json | {dpm.name}, NFE {NFE}")


if __name__ == "__main__":
    main()
