"""benchmarks/adaptive.py at reduced size: diffrax's two formulations against scipy's exact solution, its counted
evaluations against its own step statistics, the NFE interpolation, and a --quick run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deis_jax import DEISConfig, spacing
from helpers import benchmark_module

pytest.importorskip("diffrax")
adaptive = benchmark_module("adaptive")
acc = benchmark_module("accuracy")

LEVELS = spacing.sigma_range(DEISConfig())[::-1]  # (largest, smallest) rho of DEISConfig()'s schedule


@pytest.fixture(scope="module")
def problem():
    return acc.Problem(components=3, dim=2, seed=0, batch=8, noise_seed=101)


def _variant(solver, form, controller="I"):
    family = "diffrax fixed" if not controller else f"diffrax {solver.capitalize()}"
    return adaptive.Variant(family, "test", solver, form, controller)


@pytest.mark.parametrize("form", ["logrho", "vp-t"])
def test_diffrax_formulations_solve_the_exact_ode(problem, form):
    """Both formulations (y in log rho; x in the vp_linear time) at a tight tolerance end at scipy's DOP853
    solution of dy/drho = eps between the same levels."""
    r = adaptive.run_diffrax(problem, problem.model_jax, _variant("tsit5", form), LEVELS, 1e-10, 1e-10)
    ref = problem.exact(*LEVELS)
    assert r["ok"]
    assert np.max(np.linalg.norm(r["x"] - ref, axis=1) / np.linalg.norm(ref, axis=1)) < 1e-7


def test_counted_evaluations_are_fsal_stats(problem):
    """Tsit5 and Dopri5 are FSAL (7 stages, 6 new evaluations a step, accepted or rejected, plus the first):
    the vector-field calls counted by the benchmark are 1 + 6 num_steps of diffrax's own statistics, in runs
    with rejected steps too."""
    rejected = 0
    for solver in ("tsit5", "dopri5"):
        for form in ("logrho", "vp-t"):
            for rtol in (1e-2, 1e-4, 1e-6):
                r = adaptive.run_diffrax(problem, problem.model_jax, _variant(solver, form), LEVELS, rtol, rtol)
                assert r["nfe"] == 1 + 6 * (r["accepted"] + r["rejected"]) == r["stats_nfe"], (solver, form, rtol)
                rejected += r["rejected"]
    assert rejected > 0


def test_fixed_steps_count(problem):
    for n in (2, 5):
        r = adaptive.run_diffrax(problem, problem.model_jax, _variant("tsit5", "logrho", ""), LEVELS, steps=n)
        assert (r["nfe"], r["accepted"], r["rejected"]) == (1 + 6 * n, n, 0)


def _points(pairs):
    return [dict(nfe=n, error=e) for n, e in pairs]


def test_nfe_at_interpolates_log_log_on_the_pareto_front():
    """On error = 10 NFE^-2 the log-log interpolation is exact; a dominated point (more NFE, more error) is
    ignored; a target the cheapest point meets gives its NFE as a bound; an unreached one gives None."""
    law = lambda n: 10.0 * n**-2.0  # noqa: E731
    pts = _points([(10, law(10)), (40, law(40)), (25, 0.5), (100, law(100))])
    nfe, exact = adaptive.nfe_at(pts, 1e-2)
    assert exact and nfe == pytest.approx(math.sqrt(10.0 / 1e-2), rel=1e-12)
    nfe, exact = adaptive.nfe_at(pts, 2e-3)
    assert exact and nfe == pytest.approx(math.sqrt(10.0 / 2e-3), rel=1e-12)
    assert adaptive.nfe_at(pts, 0.2) == (10.0, False)
    assert adaptive.nfe_at(pts, 1e-4) is None


def test_quick_run(tmp_path):
    """The --quick run: deis_jax reports the schedule's range, every contender's error falls by over 100x from
    rtol 1e-2 to 1e-5 (deis_jax's at every decade), diffrax's counted evaluations equal its statistics, and the
    tables are written."""
    md = tmp_path / "adaptive.md"
    results, summary = adaptive.main(["--quick", "--batch", "16", "--components", "4", "--dim", "3",
                                      "--out-md", str(md)])
    (res,) = results.values()
    assert res["levels"] == pytest.approx(LEVELS, rel=1e-12)
    for name, pts in res["sweeps"].items():
        errors = [q["error"] for q in sorted(pts, key=lambda q: -q["param"])]  # rtol 1e-2 ... 1e-5
        assert errors[-1] < errors[0] / 100, (name, errors)
        if res["family"][name] == "deis_jax":  # error-per-step control: monotone in rtol (diffrax's is not)
            assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), (name, errors)
        else:
            assert all(q["nfe"] == q["stats_nfe"] and q["ok"] for q in pts), name
    text = md.read_text()
    assert "| target error | deis_jax best | diffrax Tsit5 best |" in text
    assert "| deis_jax o2 (default) | 1e-03 |" in text
    assert set(summary) == set(adaptive.TARGETS)
