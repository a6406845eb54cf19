"""The bundled digits UNet, the `python -m deis_jax demo` command, and the quality of its samples."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import deis_jax  # noqa: E402
from deis_jax import demo  # noqa: E402
from deis_jax.models.unet import DEFAULT_WEIGHTS, DigitsUNet, load_digits_unet  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load_digits_unet()


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images.reshape(len(d.images), -1) / 8.0 - 1.0).astype(np.float32), d.target


def test_weights_load_and_model_runs(model, digits):
    with np.load(DEFAULT_WEIGHTS) as data:
        n_params = sum(data[k].size for k in data.files)
    assert n_params < 300_000
    assert isinstance(model, DigitsUNet)
    x = jax.random.normal(jax.random.key(0), (5, 8, 8, 1))
    for t in (jnp.int32(0), jnp.int32(999), jnp.arange(5, dtype=jnp.int32) * 200):
        out = model(x, t)
        assert out.shape == (5, 8, 8, 1)
        assert np.isfinite(np.asarray(out)).all()
    # Trained: it predicts the noise added to real digits far better than a zero guess (MSE 1).
    ac = deis_jax.schedule.alphas_cumprod(deis_jax.DEISConfig())
    x0 = digits[0][:64].reshape(64, 8, 8, 1)
    eps = np.random.RandomState(0).randn(*x0.shape).astype(np.float32)
    for t, bound in ((100, 0.45), (500, 0.1), (900, 0.02)):
        xt = np.sqrt(ac[t]) * x0 + np.sqrt(1 - ac[t]) * eps
        assert float(jnp.mean((model(xt, jnp.int32(t)) - eps) ** 2)) < bound, t


def test_demo_writes_png(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert demo.main(["--num", "8", "--nfe", "5", "--seed", "1", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == demo.grid_size(8) == (3 * 34 + 2, 3 * 34 + 2)
        assert img.mode == "L"
    text = capsys.readouterr().out
    assert "NFE=5" in text and "warm" in text and str(out) in text


def test_cli_without_subcommand_exits_2():
    r = subprocess.run([sys.executable, "-m", "deis_jax"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_samples_look_like_digits(model, digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import NearestNeighbors

    x, y = digits
    sampler = demo.make_sampler(model, deis_jax.DEISConfig(solver_order=3), nfe=10, num=64)
    samples = np.asarray(sampler(jax.random.key(0))).reshape(64, -1)
    assert np.isfinite(samples).all()
    clipped = np.clip(samples, -1, 1)
    rs = np.random.RandomState(0)
    shuffled = np.array([rs.permutation(s) for s in clipped])  # same pixel values, no structure
    uniform = rs.uniform(-1, 1, samples.shape)

    # A classifier fit on the real digits plus an 11th class of pixel-shuffled real digits
    # (right pixel histogram, no shape) calls the samples digits, confidently and of many kinds.
    xs = np.array([rs.permutation(d) for d in x])
    clf = LogisticRegression(max_iter=3000).fit(np.concatenate([x, xs]), np.concatenate([y, np.full(len(x), 10)]))
    conf = lambda a: clf.predict_proba(a)[:, :10].max(axis=1).mean()  # noqa: E731
    assert conf(clipped) > 0.6 and conf(clipped) > conf(uniform) + 0.4, (conf(clipped), conf(uniform))
    labels = clf.predict(clipped)
    assert np.mean(labels < 10) > 0.85 and len(set(labels[labels < 10])) >= 7, labels

    # Samples lie near the data: nearest real digit much closer than for the shuffled samples.
    nn = NearestNeighbors(n_neighbors=1).fit(x)
    dist = lambda a: nn.kneighbors(a)[0].mean()  # noqa: E731
    assert dist(clipped) < 4.0 and dist(clipped) < 0.5 * dist(shuffled), (dist(clipped), dist(shuffled))

    # Pixel statistics close to the data's: mostly background near -1, values in range.
    assert np.quantile(np.abs(samples), 0.99) < 2.0
    frac_bg = lambda a: float(np.mean(a < -0.75))  # noqa: E731
    assert abs(frac_bg(samples) - frac_bg(x)) < 0.1, (frac_bg(samples), frac_bg(x))
    hist = lambda a: np.histogram(np.clip(a, -1, 1), bins=8, range=(-1, 1))[0] / a.size  # noqa: E731
    assert 0.5 * np.abs(hist(samples) - hist(x)).sum() < 0.2  # total-variation distance


def test_demo_options_reach_the_sampler(tmp_path, capsys):
    """Solver, algorithm, final-step and grid options build that config and grid, and the run reports them."""
    args = demo.parse_args(["--solver-type", "ipndm", "--order", "4", "--algorithm-type", "data_prediction",
                            "--final-sigmas-type", "zero", "--grid", "karras", "--nfe", "6"])
    config, sigmas = demo.resolve(args)
    assert sigmas is None
    assert config == deis_jax.DEISConfig(solver_type="ipndm", solver_order=4, algorithm_type="data_prediction",
                                         final_sigmas_type="zero", use_karras_sigmas=True)
    args = demo.parse_args(["--grid", "ays_sd15_timesteps", "--nfe", "10", "--final-sigmas-type", "zero"])
    config, sigmas = demo.resolve(args)
    rhos = deis_jax.schedule.train_rhos(config)
    np.testing.assert_array_equal(sigmas, np.append(rhos[[999, 850, 736, 645, 545, 455, 343, 233, 124, 24]], 0.0))

    out = tmp_path / "g.png"
    assert demo.main(["--num", "4", "--nfe", "3", "--solver-type", "rhork", "--order", "2",
                      "--final-sigmas-type", "zero", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NFE=5" in text and "solver_type='rhork'" in text  # 2 Heun steps of 2 evaluations, then one to 0


@pytest.mark.parametrize("argv, match", [
    (["--grid", "cosine"], "--grid='cosine' is invalid"),
    (["--order", "4"], "solver_order=4 is invalid"),  # logrho stops at 3
    (["--algorithm-type", "dpm"], "invalid choice"),
])
def test_demo_rejects_bad_options(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        demo.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
