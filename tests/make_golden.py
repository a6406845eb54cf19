"""Regenerate tests/golden/diffusers_deis.npz from diffusers (needs torch and diffusers).

    python tests/make_golden.py

For each case of `grid.golden_grid()` it stores the config (JSON), the step count, mu,
diffusers' timesteps and sigmas, and its float32 and float64 trajectories on the toy model
from `helpers.initial_noise(shape)`.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from grid import golden_grid  # noqa: E402
from helpers import diffusers_trajectory, initial_noise  # noqa: E402

PATH = os.path.join(os.path.dirname(__file__), "golden", "diffusers_deis.npz")


def main():
    import diffusers

    arrays = {"diffusers_version": np.array(diffusers.__version__)}
    names = []
    for name, kwargs, n, shape, mu in golden_grid():
        x0 = initial_noise(shape)
        timesteps, sigmas, ref32 = diffusers_trajectory(kwargs, n, x0, mu)
        _, _, ref64 = diffusers_trajectory(kwargs, n, x0, mu, double=True)
        arrays.update({
            f"{name}/config": np.array(json.dumps({"kwargs": kwargs, "n": n, "shape": shape, "mu": mu})),
            f"{name}/timesteps": timesteps, f"{name}/sigmas": sigmas,
            f"{name}/samples32": ref32, f"{name}/samples64": ref64,
        })
        names.append(name)
    arrays["names"] = np.array(names)
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    np.savez_compressed(PATH, **arrays)
    print(f"wrote {len(names)} cases to {PATH}")


if __name__ == "__main__":
    main()
