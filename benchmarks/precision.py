"""Float32 precision: deis_jax's float32 samples and diffusers' float32 samples, both measured against
diffusers' float64 math (its own loop with the sigma table promoted to float64 and a float64 sample).

deis_jax builds its weight tables in float64 on the host and casts them once, so its float32 run
only rounds the per-step update; diffusers computes its coefficients in float32 each step. On
ill-conditioned grids (close log-rho nodes: beta sigmas, many steps, sample / v prediction) the
table error dominates. Every step of the trajectory counts: error = max over steps of
|x - x_ref|_inf / |x_ref|_inf (`tests/helpers.relative_error`), the toy model of the parity tests.
The spread is over `--seeds` initial noises (median and max of the ratio). The last column, deis_jax's
float32 run against its own float64 run, is the rounding of the float32 update itself: no table can
do better than that.

    python benchmarks/precision.py            # writes benchmarks/precision_results.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import deis_jax as dj  # noqa: E402
from helpers import deis_trajectory, diffusers_trajectory, initial_noise, relative_error  # noqa: E402

GRIDS = {
    "linspace": {},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "cosine schedule": {"beta_schedule": "squaredcos_cap_v2"},
    "flow, shift 3": {"use_flow_sigmas": True, "flow_shift": 3.0},
}
PREDICTIONS = ("epsilon", "sample", "v_prediction")


def measure(grid: str, prediction_type: str, steps: int, order: int, seeds: int) -> dict:
    kwargs = dict(GRIDS[grid], solver_order=order,
                  prediction_type="flow_prediction" if "flow" in grid else prediction_type)
    config = dj.DEISConfig(**kwargs)
    ours_errs, theirs_errs, floors = [], [], []
    for seed in range(seeds):
        x0 = initial_noise((2, 4, 4, 4), seed=seed)
        _, ref64 = diffusers_trajectory(config.to_diffusers(), steps, x0.astype(np.float64), double=True)[::2]
        _, ref32 = diffusers_trajectory(config.to_diffusers(), steps, x0)[::2]
        _, ours = deis_trajectory(config, steps, x0)
        with jax.enable_x64(True):
            _, ours64 = deis_trajectory(config, steps, x0.astype(np.float64))
        ours_errs.append(relative_error(ours, ref64))
        theirs_errs.append(relative_error(ref32, ref64))
        floors.append(relative_error(ours, ours64))
    ratios = np.array(ours_errs) / np.array(theirs_errs)
    return dict(grid=grid, prediction=kwargs["prediction_type"], steps=steps, order=order,
                ours=float(np.median(ours_errs)), theirs=float(np.median(theirs_errs)),
                floor=float(np.median(floors)), ratio=float(np.median(ratios)), ratio_max=float(ratios.max()))


def cases(quick: bool):
    steps_list = (25,) if quick else (10, 25, 100, 500)
    for grid in GRIDS:
        for prediction_type in PREDICTIONS[:1] if "flow" in grid else PREDICTIONS:
            for steps in steps_list:
                yield grid, prediction_type, steps, 3


def table(rows) -> str:
    lines = ["| grid | prediction | steps | deis_jax f32 error | diffusers f32 error | ratio (median) | ratio (max) "
             "| deis_jax f32 vs its f64 run |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['grid']} | {r['prediction']} | {r['steps']} | {r['ours']:.1e} | {r['theirs']:.1e} | "
                     f"{r['ratio']:.3f} | {r['ratio_max']:.3f} | {r['floor']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="25 steps only")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = [measure(*case, seeds=args.seeds) for case in cases(args.quick)]
    text = (f"# Float32 precision against diffusers' float64 math\n\n"
            f"`python benchmarks/precision.py` ({args.seeds} seeds, order 3, toy model of the parity tests; "
            f"{time.perf_counter() - start:.0f} s). Error: max over steps of the relative inf-norm distance "
            f"to diffusers' float64 trajectory. Ratio < 1: deis_jax's float32 run is closer.\n\n{table(rows)}\n")
    print(text)
    if not args.quick:
        with open(os.path.join(os.path.dirname(__file__), "precision_results.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
