"""benchmarks/stochastic.py at reduced size: its statistics against direct computations, its noise floor against
deliberately wrong samplers, the reverse SDE at many steps inside the floor, its diffusers driver against
deis_jax at first order, and a tiny run that writes the tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from helpers import benchmark_module

st = benchmark_module("stochastic")
acc = st.acc


def test_mmd2_is_the_unbiased_double_sum():
    rng = np.random.default_rng(0)
    x, y, h = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.5, 1.3
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * h * h))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(a, b) for a in x for b in y) / 35
    assert st.mmd2(x, y, h) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_exact_samples_moments_and_width():
    """Exact samples have the closed-form moments and a width ratio of 1; components 1.5x as wide give 1.5^2."""
    mix = acc.make_mixture(12, 12, 0)
    x = st.exact_samples(mix, 40_000, np.random.default_rng(1))
    mean, var = st.mixture_moments(mix)
    np.testing.assert_allclose(x.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(x.var(0), var, rtol=0.05)
    assert st.width_ratio(mix, x) == pytest.approx(1.0, abs=0.01)
    wide = acc.Mixture(mix.log_pi, mix.means, 1.5 * mix.stds)
    assert st.width_ratio(mix, st.exact_samples(wide, 40_000, np.random.default_rng(2))) == pytest.approx(2.25,
                                                                                                          rel=0.02)


@pytest.fixture(scope="module")
def wide_mixture():
    """A 6-component mixture in 4 dims with stds 0.2-0.4: wide enough that the final step to the denoised
    estimate at the last linspace timestep of 200 steps (rho = 0.030) narrows a component's variance by < 2.5%."""
    base = acc.make_mixture(6, 4, 3)
    mix = acc.Mixture(base.log_pi, 2.0 * base.means, np.linspace(0.2, 0.4, 6))
    rng = np.random.default_rng(5)
    n = 1000
    reference = st.exact_samples(mix, n, rng)
    h = st.median_bandwidth(st.exact_samples(mix, n, rng))
    floor = st.floor_statistics(mix, reference, h, n, 10, 6)
    return mix, reference, h, floor, n


def outside(floor, stats, stat, k):
    mean, sd = floor[stat]
    return abs(stats[stat] - mean) > k * sd


def test_floor_is_below_wrong_samplers(wide_mixture):
    """Components 1.3x too wide, and the ODE at 4 steps (first order), both lie far outside the exact-vs-exact
    spread of the narrow MMD and of the width ratio."""
    mix, reference, h, floor, n = wide_mixture
    blurred = st.exact_samples(acc.Mixture(mix.log_pi, mix.means, 1.3 * mix.stds), n, np.random.default_rng(9))
    row = st.Row("ode", "data", 1, 0.0)
    x_T = np.random.default_rng(8).standard_normal((n, 4))
    with jax.enable_x64(True):
        coarse = np.asarray(st.deis_sampler(jax.jit(acc.model_jax(mix)), row, 4)(jnp.asarray(x_T), None))
    for x in (blurred, coarse):
        stats = st.statistics(mix, x, reference, h)
        assert outside(floor, stats, "mmd2_narrow", 5) and outside(floor, stats, "width", 5), (stats, floor)


@pytest.mark.parametrize("form", ["data", "eps"])
def test_reverse_sde_at_many_steps_is_within_the_floor(wide_mixture, form):
    """eta = 1 with 200 steps samples the mixture: every statistic within 3 std of the exact-vs-exact floor."""
    mix, reference, h, floor, n = wide_mixture
    row = st.Row("sde", form, 2, 1.0)
    x_T = np.random.default_rng(8).standard_normal((n, 4))
    with jax.enable_x64(True):
        x = np.asarray(st.deis_sampler(jax.jit(acc.model_jax(mix)), row, 200)(jnp.asarray(x_T), jax.random.key(1)))
    stats = st.statistics(mix, x, reference, h)
    assert not any(outside(floor, stats, s, 3) for s in st.STATS), (stats, floor)


def test_diffusers_sde_driver_is_deis_data_form_order_1():
    """diffusers' sde-dpmsolver++ at order 1 and deis_jax's data form at order 1 with eta = 1 are the same
    first-order SDE step (x' = (sigma'/sigma) e^-h x + alpha' (1 - e^-2h) x0 + sigma' sqrt(1 - e^-2h) z): fed the
    same per-step noise, they end at the same samples."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import DPMSolverMultistepScheduler

    p = acc.Problem(components=3, dim=2, seed=0, batch=16)
    steps = 8
    noises = np.random.default_rng(4).standard_normal((steps, *p.x_T.shape))
    sched = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=1)
    sched.set_timesteps(steps)
    x = torch.from_numpy(p.x_T.copy())
    for t, z in zip(sched.timesteps, noises, strict=True):
        eps = torch.from_numpy(acc.model_np(p.mix, x.numpy(), int(t)))
        x = sched.step(eps, t, x, variance_noise=torch.from_numpy(z)).prev_sample
    config = st.Row("x", "data", 1, 1.0).config
    with jax.enable_x64(True):
        y = jnp.asarray(p.x_T)
        state = dj.set_timesteps(config, steps, y.shape, dtype=jnp.float64, eta=1.0)
        for t, z in zip(state.timesteps, noises, strict=True):
            y, state = dj.step(state, p.model_jax(y, t), t, y, variance_noise=jnp.asarray(z))
    assert np.abs(x.numpy()).max() > 0.5
    np.testing.assert_allclose(np.asarray(y), x.numpy(), rtol=1e-4, atol=1e-4)


def test_tiny_run_writes_tables(tmp_path):
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    store = st.main(["--quick", "--nfe", "4", "--components", "3", "--dim", "2", "--mix-samples", "100",
                     "--floor-repeats", "3", "--num-samples", "20", "--bootstrap", "3", "--out-json", str(js),
                     "--out-md", str(md)])
    text = md.read_text()
    for heading in ("## Gaussian mixture", "MMD² × 1e4", "Within-component spread", "## Digits: FID",
                    "### deis_jax vs diffusers' SDE-DPM-Solver++(2M)"):
        assert heading in text, heading
    assert set(store["digits"]["rows"]) == {r.name for r in st.digits_rows(True)}
    assert {r["row"]["eta"] for r in store["mixture"]["rows"].values()} == set(st.ETAS)
    again = st.main(["--quick", "--parts", "mixture", "--nfe", "4", "--components", "3", "--dim", "2",
                     "--mix-samples", "100", "--floor-repeats", "3", "--out-json", str(js)])
    assert again["digits"] == store["digits"]  # a later part keeps the stored one
