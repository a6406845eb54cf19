"""Parity with committed diffusers reference files (no torch needed); see make_golden.py."""

import json
import os

import jax
import numpy as np
import pytest

import deis_jax as dj
from helpers import assert_float32_parity, deis_trajectory, initial_noise, relative_error

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "golden", "diffusers_deis.npz"))
NAMES = [str(n) for n in GOLDEN["names"]]


def _case(name):
    spec = json.loads(str(GOLDEN[f"{name}/config"]))
    return spec["kwargs"], spec["n"], tuple(spec["shape"]), spec["mu"]


def test_golden_file_covers_every_order_and_sigma_schedule():
    assert len(NAMES) >= 15
    for key in ("o1-", "o2-", "o3-", "-karras-", "-exponential-", "-beta-", "-flow-", "-flow_dynamic-"):
        assert any(key in n for n in NAMES), key


@pytest.mark.parametrize("name", NAMES)
def test_matches_golden(name):
    kwargs, n, shape, mu = _case(name)
    x0 = initial_noise(shape)
    state, ours = deis_trajectory(dj.DEISConfig(**kwargs), n, x0, mu)
    np.testing.assert_array_equal(np.asarray(state.timesteps), GOLDEN[f"{name}/timesteps"])
    np.testing.assert_allclose(np.asarray(state.sigmas), GOLDEN[f"{name}/sigmas"], rtol=1e-6)
    assert_float32_parity(ours, GOLDEN[f"{name}/samples32"], GOLDEN[f"{name}/samples64"])


@pytest.mark.parametrize("name", NAMES[::3])
def test_matches_golden_float64(name):
    kwargs, n, shape, mu = _case(name)
    with jax.enable_x64(True):
        _, ours = deis_trajectory(dj.DEISConfig(**kwargs), n, initial_noise(shape).astype(np.float64), mu)
    assert relative_error(ours, GOLDEN[f"{name}/samples64"]) <= 1e-6
