"""Live parity with diffusers' DEISMultistepScheduler over a grid of configurations.

Skipped where diffusers/torch are not installed; `test_golden.py` covers the same ground offline.
"""

import jax
import numpy as np
import pytest

import deis_jax as dj
from grid import parity_grid
from helpers import assert_float32_parity, deis_trajectory, diffusers_trajectory, initial_noise, relative_error

pytest.importorskip("torch")
pytest.importorskip("diffusers")

CASES = parity_grid()


def test_grid_is_large():
    assert len(CASES) > 200


@pytest.mark.parametrize("name,kwargs,n,shape,mu", CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers(name, kwargs, n, shape, mu):
    x0 = initial_noise(shape)
    timesteps, sigmas, ref32 = diffusers_trajectory(kwargs, n, x0, mu)
    _, _, ref64 = diffusers_trajectory(kwargs, n, x0, mu, double=True)
    state, ours = deis_trajectory(dj.DEISConfig(**kwargs), n, x0, mu)

    np.testing.assert_array_equal(np.asarray(state.timesteps), timesteps)
    np.testing.assert_allclose(np.asarray(state.sigmas), sigmas, rtol=1e-6)
    assert np.isfinite(ours).all()
    assert_float32_parity(ours, ref32, ref64)


@pytest.mark.parametrize("name,kwargs,n,shape,mu", CASES[::4], ids=[c[0] for c in CASES[::4]])
def test_matches_diffusers_float64(name, kwargs, n, shape, mu):
    """In float64 both compute the same math: agreement to rounding, far below 1e-4."""
    x0 = initial_noise(shape).astype(np.float64)
    _, _, ref64 = diffusers_trajectory(kwargs, n, x0, mu, double=True)
    with jax.enable_x64(True):
        _, ours = deis_trajectory(dj.DEISConfig(**kwargs), n, x0, mu)
    assert ours.dtype == np.float64
    assert relative_error(ours, ref64) <= 1e-6
