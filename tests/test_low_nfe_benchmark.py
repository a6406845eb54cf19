"""benchmarks/low_nfe.py at reduced size: its step counts, selection, diffusers drivers, classifier guidance and
bootstrap are checked against independent computations, and a tiny run writes its tables and plot."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import DEISConfig, schedule
from helpers import benchmark_module

pytest.importorskip("flax")
pytest.importorskip("sklearn")

low = benchmark_module("low_nfe")
acc, dfid = low.acc, low.dfid


@pytest.fixture(scope="module")
def models():
    return low.load_models()


@pytest.mark.parametrize("kw", [dict(solver_type="rhork", solver_order=2), dict(solver_type="rhork", solver_order=3),
                                dict(solver_type="tab", solver_order=3)])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_steps_for_nfe_is_the_most_that_fit(kw, final):
    """The library's own count of evaluations: steps_for_nfe fits within the NFE, one more step does not."""
    config = DEISConfig(**kw, final_sigmas_type=final)
    evals = lambda n: dj.set_timesteps(config, n, (1,)).num_inference_steps  # noqa: E731
    for nfe in (4, 5, 6, 8, 10):
        steps = acc.steps_for_nfe(config, nfe)
        assert evals(steps) <= nfe < evals(steps + 1), (nfe, steps)


def test_selection_picks_the_lowest_training_score():
    train = acc.Problem(components=3, dim=2, seed=0, batch=8, noise_seed=5)
    test = acc.Problem(components=3, dim=2, seed=0, batch=8, noise_seed=6)
    assert not np.allclose(train.x_T, test.x_T) and np.array_equal(train.mix.means, test.mix.means)
    rows = [low.deis_row("logrho", 2, g, True, "data") for g in ("linspace", "exp", "karras")]
    nfes = (4, 6)
    error = lambda r, n: low.mixture_errors(train, r, n)["zero"]  # noqa: E731
    (chosen,) = low.select_hand_grids(error, {("logrho", "data"): rows}, nfes, log=lambda *a, **k: None)
    scores = []
    for r in rows:  # recomputed from the accuracy benchmark's pieces: the end point vs the exact flow to 0
        errs = []
        for n in nfes:
            x, s, _ = acc.run_deis_jax(train, r.config, n)
            ref = train.exact(float(s[0]), 0.0)
            errs.append(np.mean(np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)))
        scores.append(math.exp(np.mean(np.log(errs))))
    assert chosen["row"]["name"] == rows[int(np.argmin(scores))].name
    assert chosen["train_score"] == pytest.approx(min(scores), rel=1e-12)


def test_errors_at_zero_and_at_own_end():
    """A run ending at sigma_min is measured against the exact flow to sigma = 0 and to its own end."""
    p = acc.Problem(components=3, dim=2, seed=0, batch=8)
    row = low.deis_row("rhoab", 3, "linspace", True, "eps", final_sigmas_type="sigma_min")
    e = low.mixture_errors(p, row, 100)
    x, s, _ = acc.run_deis_jax(p, row.config, 100)
    rel = lambda ref: np.mean(np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1))  # noqa: E731
    assert s[-1] == pytest.approx(schedule.train_rhos(DEISConfig())[0], rel=1e-6)
    assert e["zero"] == pytest.approx(rel(p.exact(float(s[0]), 0.0)), rel=1e-12)
    assert e["own"] == pytest.approx(rel(p.exact(float(s[0]), float(s[-1]))), rel=1e-12)
    assert e["own"] < 0.8 * e["zero"]  # the residual noise at sigma(t=0) = 0.01 is part of the error at 0


def test_ddim_driver_equals_deis_order1_to_zero():
    """diffusers' DDIM (trailing, set_alpha_to_one) at N = 5 is first-order DEIS on the same grid with a last step
    to the denoised estimate: equal end points on the mixture (diffusers keeps alphas_cumprod in float32). At
    N = 6 its last step lands on t = 0 (166 - 1000 // 6), so it ends at sigma(t=0), and the driver says so (its
    steps also go 999 -> 833 while the model is next called at 832, so it is not DEIS there)."""
    pytest.importorskip("diffusers")
    p = acc.Problem(components=3, dim=2, seed=0, batch=8)
    ddim = next(r for r in low.diffusers_rows() if r.name == "DDIM trailing")
    x, s, nfe = low.run_mixture(p, ddim, 5)
    y, t, nfe2 = low.run_mixture(p, low.deis_row("logrho", 1, "trailing", True, "eps"), 5)
    assert nfe == nfe2 == 5 and s[-1] == t[-1] == 0.0 and s[0] == pytest.approx(t[0], rel=1e-6)
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert low.run_mixture(p, ddim, 6)[1][-1] == pytest.approx(schedule.train_rhos(DEISConfig())[0], rel=1e-6)


def test_digits_drivers_agree_at_order_1(models):
    """The diffusers loop (DPM-Solver++ order 1, final step to 0) and the jitted deis_jax sampler (data form,
    order 1, final step to 0) are the same first-order exponential integrator: same digits."""
    pytest.importorskip("diffusers")
    unet, _ = models
    noise = dfid.initial_noise(3, 16)
    row = low.Row("diffusers DPM++", "DPM++ o1", tuple(sorted(dict(
        algorithm_type="dpmsolver++", solver_order=1, final_sigmas_type="zero").items())))
    ours = low.deis_generator(unet, low.deis_row("logrho", 1, "linspace", True, "data").config, 5)(noise)
    theirs = low.diffusers_generator(unet, row, 5)(noise)
    assert np.abs(ours).max() > 0.5
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_guided_model_matches_closed_form():
    """Linear eps-model eps = c x and linear classifier logits = x0 W: x0_hat = x (1 - sigma c) / alpha and
    grad_x0 log p(y | x0_hat) = W (e_y - softmax(x0_hat W)) per sample; eps_guided = eps - s sigma alpha grad."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 2, 2, 1)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 10)), jnp.float32)
    labels = jnp.array([0, 3, 7, 9])
    c, scale, t = 0.3, 2.5, 400
    fn = low.guided_model(lambda x, t: c * x, lambda x0: x0.reshape(len(x0), -1) @ w, labels, scale)
    rho = float(schedule.rho_at(DEISConfig(), t))
    alpha, sigma = 1 / math.sqrt(1 + rho**2), rho / math.sqrt(1 + rho**2)
    x0 = np.asarray(x).reshape(4, -1) * (1 - sigma * c) / alpha
    logits = x0 @ np.asarray(w)
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    grad = (np.eye(10)[np.asarray(labels)] - prob) @ np.asarray(w).T
    want = c * np.asarray(x).reshape(4, -1) - scale * sigma * alpha * grad
    np.testing.assert_allclose(np.asarray(fn(x, jnp.int32(t))).reshape(4, -1), want, rtol=2e-4, atol=2e-5)
    unguided = low.guided_model(lambda x, t: c * x, lambda x0: x0.reshape(len(x0), -1) @ w, labels, 0.0)
    np.testing.assert_array_equal(np.asarray(unguided(x, jnp.int32(t))), np.asarray(c * x))


def test_guidance_steers_the_digits_to_their_class(models):
    unet, classifier = models
    noise = dfid.initial_noise(7, 60)
    targets = np.arange(60) % 10
    gen = low.deis_generator(unet, low.deis_row("logrho", 2, "linspace", True, "data").config, 5,
                             classifier=classifier)
    real, labels = dfid.real_digits()
    judge, judge_acc = low.pixel_judge(real, labels)
    assert judge_acc > 0.9
    hits = {}
    for scale in (0.0, 1.0):
        images = np.clip(gen(noise, jnp.asarray(targets), scale), -1, 1)
        hits[scale] = float((judge(images) == targets).mean())
    assert hits[0.0] < 0.25 and hits[1.0] > hits[0.0] + 0.25, hits


def test_measure_bootstrap_and_nonfinite(models):
    _, classifier = models
    real, _ = dfid.real_digits()
    embed = dfid.make_embedder(classifier)
    real_stats = dfid.gaussian_stats(embed(real)[0])
    images = real[::9][:150].copy()
    cell = low.measure(images, embed, real_stats, bootstrap=30, reference=images)
    feats = embed(images)[0]
    assert cell["fid"] == pytest.approx(dfid.fid(feats, embed(real)[0]), rel=1e-9)
    assert cell["nonfinite"] == 0 and cell["rms"] == 0.0 and len(cell["boot"]) == 30
    assert 0 < cell["fid_sd"] < cell["fid"]
    assert low.compare(cell, cell) == dict(diff=0.0, spread=cell["fid_sd"], paired_sd=0.0)  # same indices
    images[:3, 0, 0, 0] = np.nan
    bad = low.measure(images, embed, real_stats, bootstrap=5)
    assert bad["nonfinite"] == 3 and math.isfinite(bad["fid"])
    assert math.isnan(low.compare(bad, cell)["paired_sd"])  # not resampled alike: no paired spread


def test_verdict():
    assert low.verdict(dict(diff=-0.1, spread=0.5, paired_sd=0.1)) == "met"
    assert low.verdict(dict(diff=0.3, spread=0.5, paired_sd=0.1)) == (
        "met within spread (+0.30; FID sd 0.50, paired sd 0.10)")
    assert low.verdict(dict(diff=1.5, spread=0.5, paired_sd=0.1)) == "MISSED by 1.50 (FID sd 0.50, paired sd 0.10)"


def test_tiny_run_writes_tables_and_plot(tmp_path):
    md, png, js = tmp_path / "r.md", tmp_path / "r.png", tmp_path / "r.json"
    tiny = ["--quick", "--nfe", "3", "--components", "3", "--dim", "2", "--batch", "8", "--learn-nfe", "3",
            "--learn-train-steps", "2", "--learn-reference-steps", "10", "--out-json", str(js)]
    store = low.main(tiny + ["--num-samples", "40", "--bootstrap", "5", "--guided-samples", "20", "--digits-learn-nfe",
                             "3", "--learn-batch", "8", "--out-md", str(md), "--out-png", str(png)])
    text = md.read_text()
    for heading in ("## Targets", "## Gaussian mixture", "### Hand-grid selection", "## Digits: FID",
                    "### Digits hand-grid selection",
                    "### Best deis_jax vs best diffusers", "## Guided digits"):
        assert heading in text, heading
    rows = store["digits"]["rows"]
    assert len(store["mixture"]["selection"]) == 2 * len(low.QUICK_SOLVER_TYPES)
    want = {s["row"]["name"] for s in store["select"]["selection"]}
    want |= (set(low.QUICK_DIFFUSERS) if acc.HAVE_DIFFUSERS else set()) | {low.counterpart_rows()[0].name}
    assert set(rows) == want | ({f"learned {store['learn']['row']['name']}"} if store["learn"]["available"] else set())
    assert {c["form"] for c in store["guided"]["cells"]} == {"eps", "data"}
    assert png.stat().st_size > 10_000
    again = low.main(tiny + ["--parts", "mixture"])  # a later part keeps the stored ones
    assert again["digits"]["rows"].keys() == rows.keys()
    assert len(again["guided"]["cells"]) == len(store["guided"]["cells"])
