"""The digits classifier and the core of benchmarks/digits_fid.py at reduced size (200 samples)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

from deis_jax import DEISConfig  # noqa: E402
from deis_jax.models.classifier import FEATURE_DIM, load_digits_classifier  # noqa: E402
from deis_jax.models.unet import load_digits_unet  # noqa: E402
from helpers import benchmark_module  # noqa: E402

N = 200


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("digits_fid")


@pytest.fixture(scope="module")
def real(bench):
    return bench.real_digits()


@pytest.fixture(scope="module")
def embed(bench):
    return bench.make_embedder(load_digits_classifier(), batch_size=N)


@pytest.fixture(scope="module")
def real_stats(bench, real, embed):
    return bench.gaussian_stats(embed(real[0])[0])


def test_classifier_accuracy_and_shapes(real, embed):
    images, labels = real
    feats, probs = embed(images)
    assert feats.shape == (len(images), FEATURE_DIM) and probs.shape == (len(images), 10)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == labels).mean() > 0.95


def test_frechet_distance_matches_sqrtm(bench):
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (m1, s1), (m2, s2) = bench.gaussian_stats(a), bench.gaussian_stats(b)
    ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert bench.fid(a, b) == pytest.approx(ref, rel=1e-8)
    assert bench.fid(a, a) == pytest.approx(0.0, abs=1e-8)


def test_benchmark_core_orders_real_generated_noise(bench, real, embed, real_stats):
    samplers = [bench.Sampler("DEIS logrho-3", DEISConfig(solver_order=3)),
                bench.Sampler("DDIM", DEISConfig(solver_order=1))]
    res = bench.run_benchmark(load_digits_unet(), load_digits_classifier(), samplers, (10, 50), N, batch_size=N,
                              ref_nfe=0, log=lambda *a, **k: None)
    refs, cells = res["refs"], res["cells"]
    assert refs["real_accuracy"] > 0.95 and refs["held_out_accuracy"] > 0.95
    noise_fid = refs["noise_fid"]
    subset = real[0][np.random.default_rng(0).permutation(len(real[0]))[:N]]
    real_fid = bench.evaluate(subset, embed, real_stats)[0]
    assert np.isfinite(real_fid) and 0 < real_fid < noise_fid

    for row in cells.values():
        for nfe, cell in row.items():
            assert cell.finite and np.isfinite(cell.fid) and cell.fid > 0 and cell.nfe == nfe
            assert 0.1 <= cell.confidence <= 1.0
    fid = {(name, nfe): cell.fid for name, row in cells.items() for nfe, cell in row.items()}
    assert fid["DEIS logrho-3", 10] < noise_fid
    # DEIS at NFE 10 beats DDIM at NFE 10 (about 16 vs 23), and at NFE 50 both have converged (about 16.5).
    assert fid["DEIS logrho-3", 10] < fid["DDIM", 10]
    assert abs(fid["DEIS logrho-3", 50] - fid["DDIM", 50]) < 0.1 * fid["DDIM", 50]
