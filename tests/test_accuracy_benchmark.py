"""The accuracy benchmark's core (benchmarks/accuracy.py) on a tiny Gaussian mixture: the exact
reference is right, DEIS converges, and deis_jax's first-order DEIS is DDIM."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import DEISConfig, schedule
from helpers import benchmark_module

acc = benchmark_module("accuracy")

RHOS = schedule.train_rhos(DEISConfig()).astype(np.float64)


@pytest.fixture(scope="module")
def problem():
    return acc.Problem(components=4, dim=3, seed=0, batch=16)


def _rel(a, b):
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def test_exact_solution_is_self_consistent(problem):
    for rho_end in (RHOS[0], 0.0):  # DEIS ends at sigma(t=0), DPM++/UniPC at 0
        loose = problem.exact(RHOS[-1], rho_end, rtol=1e-10, atol=1e-12)
        tight = problem.exact(RHOS[-1], rho_end, rtol=1e-12, atol=1e-14)
        assert np.all(np.isfinite(loose))
        assert _rel(loose, tight) < 1e-8


def test_exact_solution_matches_closed_form_for_one_gaussian():
    """One component N(mu, s^2 I): (y - mu) / sqrt(s^2 + rho^2) is constant along the flow."""
    p = acc.Problem(components=1, dim=3, seed=4, batch=8)
    mu, s = p.mix.means[0], p.mix.stds[0]
    rho0, rho1 = RHOS[-1], RHOS[0]
    y1 = mu + (p.x_T * math.sqrt(1 + rho0**2) - mu) * math.sqrt((s**2 + rho1**2) / (s**2 + rho0**2))
    assert _rel(p.exact(rho0, rho1), y1 / math.sqrt(1 + rho1**2)) < 1e-8


def test_model_is_minus_sigma_score():
    """eps = -sigma grad log p(x) of the noised mixture, checked against autodiff."""
    p = acc.Problem(components=3, dim=2, seed=1, batch=4)
    rho = 0.3
    alpha = 1 / math.sqrt(1 + rho**2)
    sigma = rho * alpha
    mix = p.mix

    def log_p(x):
        var = alpha**2 * mix.stds**2 + sigma**2
        d2 = jnp.sum((x[None] - alpha * mix.means) ** 2, axis=-1)
        return jax.scipy.special.logsumexp(mix.log_pi - 0.5 * x.shape[-1] * jnp.log(var) - 0.5 * d2 / var)

    with jax.enable_x64(True):
        x = jnp.asarray(p.x_T)
        want = -sigma * jax.vmap(jax.grad(log_p))(x)
        got = acc.eps_of_y(mix, x / alpha, rho, xp=jnp)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12)


def test_tab4_quadratic_error_decreases_with_nfe(problem):
    c = acc.deis_contender("tab", 4, "quadratic")
    errors = [problem.error(*acc.run_deis_jax(problem, DEISConfig(**c.kw), n)[:2]) for n in (5, 10, 20, 40)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.05 * errors[0], errors


@pytest.mark.parametrize("kw", [dict(solver_type="tab", solver_order=4, timestep_spacing="quadratic"),
                                dict(solver_type="rhork", solver_order=2, use_karras_sigmas=True)])
def test_benchmark_loop_is_sample_from_noise(problem, kw):
    config = DEISConfig(**kw)
    x, _, _ = acc.run_deis_jax(problem, config, 8)  # rhoRK: 8 NFE = 4 steps of 2 evaluations
    steps = 4 if config.solver_type == "rhork" else 8
    with jax.enable_x64(True):
        ref = dj.sample_from_noise(problem.model_jax, jnp.asarray(problem.x_T), config=config,
                                   num_inference_steps=steps)
        np.testing.assert_allclose(x, np.asarray(ref), rtol=1e-10, atol=1e-12)


def test_logrho_order1_is_ddim(problem):
    """DEIS order 1 is DDIM: same error (trailing spacing, DDIM's last step to alphas_cumprod[0],
    and no x0 clipping, which DDIMScheduler does by default)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    n = 10
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(n)
    x = torch.from_numpy(problem.x_T)
    for t in sched.timesteps:
        x = sched.step(torch.from_numpy(acc.model_np(problem.mix, x.numpy(), t)), t, x).prev_sample
    sigmas = [schedule.rho_at(DEISConfig(), float(sched.timesteps[0])), RHOS[0]]
    ddim = problem.error(x.numpy(), np.asarray(sigmas))

    c = acc.deis_contender("logrho", 1, "trailing")
    out, sig, nfe = acc.run_deis_jax(problem, DEISConfig(**c.kw), n)
    ours = problem.error(out, sig)
    assert nfe == n and sig[0] == pytest.approx(sigmas[0], rel=1e-6)
    assert ours == pytest.approx(ddim, rel=0.03)
    assert ours > 1e-3  # a real discretization error, not a trivially exact solve


def test_quick_run_writes_table_and_plot(tmp_path):
    md, png = tmp_path / "acc.md", tmp_path / "acc.png"
    acc.main(["--quick", "--components", "3", "--dim", "2", "--batch", "8",
              "--out-md", str(md), "--out-png", str(png)])
    text = md.read_text()
    assert "## Best deis_jax vs best diffusers" in text and "## float64 at high NFE" in text
    assert "| deis_jax | tab o4 quadratic |" in text
    assert png.stat().st_size > 10_000
