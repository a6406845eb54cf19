"""The VE / EDM benchmark's core (benchmarks/ve_edm.py) on a tiny mixture: the exact reference in VE form, EDM's
Heun sampler, the deis_jax loop, and a --quick run."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "ve_edm.py")
_spec = importlib.util.spec_from_file_location("ve_edm_benchmark", _PATH)
ve_edm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ve_edm  # dataclasses look their module up there
_spec.loader.exec_module(ve_edm)


@pytest.fixture(scope="module")
def problem():
    return ve_edm.VEProblem(components=4, dim=3, seed=0, batch=16)


def _rel(a, b):
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def test_exact_reference_is_the_ve_flow_from_sigma_max_noise():
    """One component N(mu, s^2 I): (x - mu) / sqrt(s^2 + sigma^2) is constant along the VE flow, from
    x = 80 noise at sigma = 80 to sigma = 0."""
    p = ve_edm.VEProblem(components=1, dim=3, seed=4, batch=8)
    mu, s = p.mix.means[0], p.mix.stds[0]
    want = mu + (80.0 * p.noise - mu) * s / math.sqrt(s**2 + 80.0**2)
    assert _rel(p.reference, want) < 1e-8


def test_edm_grid_is_eq5():
    """EDM's published 18-step grid ends: sigma_max, sigma_min, and sigma_1 = (80^(1/7) - (80^(1/7) - 0.002^(1/7))
    / 17)^7 = 57.586 (k-diffusion's get_sigmas_karras(18, 0.002, 80) prints 57.5860)."""
    s = ve_edm.edm_sigmas(18)
    assert s[0] == 80.0 and s[-1] == pytest.approx(0.002, rel=1e-12) and s[1] == pytest.approx(57.586, rel=1e-5)


@pytest.mark.parametrize("n", [1, 2, 6])
def test_edm_heun_equals_deis_jax_rhork2_ending_at_zero(problem, n):
    """Heun in sigma with an Euler step to 0 on EDM's grid is deis_jax's rhoRK order 2 (Heun in rho = sigma) with
    final_sigmas_type='zero' on the VE schedule: two implementations, one method."""
    config = dataclasses.replace(ve_edm.VE, solver_type="rhork", solver_order=2, final_sigmas_type="zero")
    with jax.enable_x64(True):
        ours = dj.sample_from_noise(problem.ve_model, jnp.asarray(problem.noise), config=config,
                                    num_inference_steps=n)
    heun = ve_edm.edm_heun(problem.denoise, problem.noise, n)
    np.testing.assert_allclose(np.asarray(ours), heun, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name", ["logrho o3 karras zero", "tab o4 karras data", "ipndm o4 quadratic lof=F",
                                  "rhork o3 exp zero"])
def test_benchmark_loop_is_sample_from_noise(problem, name):
    """The eager loop equals `sample_from_noise` (VE: from the noise; VP form: from x_VE / sqrt(1 + 80^2),
    then rescaled by sqrt(1 + sigma_end^2))."""
    c = next(c for c in ve_edm.candidates(False) if c.name == name)
    x, nfe = ve_edm.run_deis(problem, c, 10)
    steps = ve_edm.deis_steps(c.config, 10)
    with jax.enable_x64(True):
        start = problem.noise if c.form == "VE" else problem.x_T
        model = problem.ve_model if c.form == "VE" else problem.vp_model
        ref = np.asarray(dj.sample_from_noise(model, jnp.asarray(start), config=c.config, num_inference_steps=steps))
        end = float(dj.set_timesteps(c.config, steps, (1,), dtype=jnp.float64).sigmas[-1])
    if c.form == "VP":
        ref = ref * math.sqrt(1 + end**2)
    np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-12)
    assert nfe <= 10


def test_quick_run_writes_the_table(tmp_path):
    md = tmp_path / "ve.md"
    ve_edm.main(["--quick", "--components", "3", "--dim", "2", "--batch", "8", "--out-md", str(md)])
    text = md.read_text()
    assert "| NFE | EDM Heun | EDM Heun, N + 1 | deis_jax VE (Karras grid) |" in text
    assert "* NFE 10: worst held-out ratio" in text and "* NFE 20: worst held-out ratio" in text
    assert "| VE | rhork o2 karras zero |" in text
