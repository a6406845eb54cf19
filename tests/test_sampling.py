"""The scan sampler: equal to a Python loop, traced once, under jit / vmap / grad; errors (devices: test_sharding)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from helpers import toy_model


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_scan_equals_python_loop(order, prediction_type):
    config = dj.DEISConfig(solver_order=order, prediction_type=prediction_type)
    noise = jax.random.normal(jax.random.key(0), (2, 3, 4, 4))
    state, x = dj.set_timesteps(config, 12, noise.shape), noise
    for t in state.timesteps:  # eager, one step at a time
        x, state = dj.step(state, toy_model(x, t), t, x)
    scanned = jax.jit(lambda z: dj.sample_from_noise(toy_model, z, config=config, num_inference_steps=12))(noise)
    np.testing.assert_allclose(scanned, x, rtol=1e-5, atol=1e-5)
    assert int(state.step_index) == 12


DYNAMIC = dj.DEISConfig(use_flow_sigmas=True, use_dynamic_shifting=True, prediction_type="flow_prediction",
                        solver_order=3)


def _hand_loop(x, mu, begin_index=0, n=12):
    """`set_timesteps(DYNAMIC, n, shape, mu)`, then one eager `step` per timestep from begin_index."""
    state = dj.set_timesteps(DYNAMIC, n, x.shape, mu, begin_index=begin_index)
    for t in state.timesteps[begin_index:]:
        x, state = dj.step(state, toy_model(x, t), t, x)
    return np.asarray(x)


@pytest.mark.parametrize("name", ["sample", "sample_from_noise", "img2img"])
def test_mu_reaches_the_schedule_through_every_sampler(name):
    """Dynamic shifting: each sampler equals the hand loop over set_timesteps(..., mu) with the same
    mu, and differs from it with another mu."""
    key, shape, n = jax.random.key(5), (2, 3), 12
    noise = jax.random.normal(key, shape)
    image = jnp.asarray(np.linspace(-1, 1, 6, dtype=np.float32).reshape(shape))
    begin = n - int(n * 0.5)  # diffusers' img2img: strength 0.5 skips the first half of the steps

    def ours(mu):
        if name == "sample":
            return dj.sample(toy_model, key, shape, config=DYNAMIC, num_inference_steps=n, mu=mu)
        if name == "sample_from_noise":
            return dj.sample_from_noise(toy_model, noise, config=DYNAMIC, num_inference_steps=n, mu=mu)
        return dj.img2img(toy_model, image, noise, strength=0.5, config=DYNAMIC, num_inference_steps=n, mu=mu)

    def reference(mu):
        if name != "img2img":
            return _hand_loop(noise, mu)
        s = dj.set_timesteps(DYNAMIC, n, shape, mu).sigmas[begin]  # flow: x_t = (1 - s) x0 + s eps
        return _hand_loop((1 - s) * image + s * noise, mu, begin)

    for mu in (0.4, 1.2):
        np.testing.assert_allclose(ours(mu), reference(mu), rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(ours(0.4)) - reference(1.2)).max() > 1e-2


def test_sample_draws_noise_from_key():
    key = jax.random.key(3)
    ours = dj.sample(toy_model, key, (2, 5), num_inference_steps=7)
    ref = dj.sample_from_noise(toy_model, jax.random.normal(key, (2, 5)), num_inference_steps=7)
    np.testing.assert_array_equal(ours, ref)


def test_loop_body_traced_once_and_no_retrace():
    traces = []

    def model_fn(x, t):
        traces.append(1)  # runs once per trace of the scan body
        return toy_model(x, t)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(key):
        return dj.sample(model_fn, key, (2, 4), num_inference_steps=25)

    run(jax.random.key(0)).block_until_ready()
    run(jax.random.key(1)).block_until_ready()
    assert len(traces) == 1


def test_vmap_over_keys_equals_separate_calls():
    keys = jax.random.split(jax.random.key(0), 3)
    fn = lambda k: dj.sample(toy_model, k, (4,), num_inference_steps=10)  # noqa: E731
    batched = jax.jit(jax.vmap(fn))(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], fn(keys[i]), rtol=1e-5, atol=1e-6)


def test_grad_through_sample_is_finite():
    def loss(scale, noise):
        return jnp.sum(dj.sample_from_noise(lambda x, t: scale * toy_model(x, t), noise,
                                            config=dj.DEISConfig(solver_order=3), num_inference_steps=10) ** 2)

    g_scale, g_noise = jax.grad(loss, argnums=(0, 1))(1.0, jnp.ones((2, 3)))
    assert np.isfinite(g_scale) and np.isfinite(g_noise).all() and float(jnp.abs(g_noise).sum()) > 0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_samples_keep_their_dtype(dtype):
    out = dj.sample(toy_model, jax.random.key(0), (2, 8), num_inference_steps=10, dtype=dtype,
                    config=dj.DEISConfig(solver_order=3))
    assert out.dtype == dtype and bool(jnp.isfinite(out).all())
    ref = dj.sample_from_noise(toy_model, jax.random.normal(jax.random.key(0), (2, 8), dtype).astype(jnp.float32),
                               config=dj.DEISConfig(solver_order=3), num_inference_steps=10)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_inference_steps": 0}, (r"^num_inference_steps=0 is invalid: must be an int in 1\.\.999 "
                                  r"for timestep_spacing='linspace' and num_train_timesteps=1000\.$")),
    ({"num_inference_steps": 1000}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"shape": (2, 0)}, "shape"),
    ({"shape": "2x3"}, "shape"),
    ({"mu": 0.5}, "mu"),
    ({"begin_index": 10}, "begin_index"),
    ({"begin_index": -1}, "begin_index"),
    ({"begin_index": 2.0}, "begin_index=2.0"),
    ({"begin_index": True}, "begin_index=True"),
    ({"config": dj.DEISConfig(solver_type="rhork", solver_order=2), "begin_index": 1},
     r"begin_index=1 .* a multiple of solver_order=2"),
    ({"config": DYNAMIC, "mu": math.nan}, "mu"),
    ({"config": DYNAMIC, "mu": math.inf}, "mu"),
    ({"config": dj.DEISConfig(time_schedule="vp_linear"), "num_inference_steps": 10_001}, "num_inference_steps"),
])
def test_bad_call_arguments(kwargs, match):
    args = dict(config=dj.DEISConfig(), num_inference_steps=10, shape=(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dj.set_timesteps(args.pop("config"), args.pop("num_inference_steps"), args.pop("shape"), **args)


@pytest.mark.parametrize("config,n", [(dj.DEISConfig(), 999), (dj.DEISConfig(timestep_spacing="leading"), 999),
                                      (dj.DEISConfig(time_schedule="vp_linear", solver_order=1), 10_000)])
def test_largest_step_count_is_accepted(config, n):
    """The upper end of 1..max: num_train_timesteps - 1 distinct discrete timesteps, 10,000 in continuous time."""
    t = np.asarray(dj.set_timesteps(config, n, (1,)).timesteps)
    assert t.shape == (n,) and (np.diff(t) < 0).all()


@pytest.mark.parametrize("begin_index", [0, 4, 9])
def test_sample_from_noise_starts_at_begin_index(begin_index):
    """The solve starts at step begin_index with a fresh warm-up; from the last step (N - 1) it is
    one DDIM step: x' = alpha' (x - sigma eps) / alpha + sigma' eps."""
    config, n = dj.DEISConfig(solver_order=3), 10
    x = jax.random.normal(jax.random.key(2), (2, 3))
    out = dj.sample_from_noise(toy_model, x, config=config, num_inference_steps=n, begin_index=begin_index)
    state = dj.set_timesteps(config, n, x.shape, begin_index=begin_index)
    assert np.asarray(state.orders)[begin_index:begin_index + 3].tolist() == [1, 2, 3][:n - begin_index]
    ref = x
    for t in state.timesteps[begin_index:]:
        ref, state = dj.step(state, toy_model(ref, t), t, ref)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    if begin_index == n - 1:
        s = np.asarray(state.sigmas)[-2:].astype(np.float64)
        (a, a1), (sig, sig1) = 1 / np.sqrt(1 + s**2), s / np.sqrt(1 + s**2)
        eps = np.asarray(toy_model(x, state.timesteps[-1]))
        np.testing.assert_allclose(out, a1 * (np.asarray(x) - sig * eps) / a + sig1 * eps, rtol=1e-5, atol=1e-6)


def test_model_output_shape_mismatch_names_both_shapes():
    match = r"model_output.shape=\(2, 4\).* must both equal the shape given to set_timesteps, \(2, 3\)\."
    with pytest.raises(ValueError, match=match):
        dj.sample(lambda x, t: jnp.zeros((2, 4)), jax.random.key(0), (2, 3), num_inference_steps=5)


def test_config_must_be_a_deis_config():
    with pytest.raises(ValueError, match="config"):
        dj.set_timesteps({"solver_order": 2}, 10, (1,))


def test_epsilon_output_is_eps_unchanged():
    """Without thresholding an epsilon model's output is eps itself: not recomputed through x0
    (eps = (x - alpha x0) / sigma would add rounding, amplified by 1 / sigma on the last steps)."""
    state = dj.set_timesteps(dj.DEISConfig(), 10, (8, 8), begin_index=9)
    x, m = jax.random.normal(jax.random.key(0), (2, 8, 8))
    np.testing.assert_array_equal(dj.convert_model_output(state, m, x), m)


def test_no_progress_bar_by_default(capsys):
    """progress defaults to False in run_loop, sample_from_noise, sample and img2img."""
    x = jax.random.normal(jax.random.key(0), (2, 3))
    state = dj.set_timesteps(dj.DEISConfig(), 4, x.shape)
    dj.run_loop(toy_model, x, state)
    dj.sample_from_noise(toy_model, x, num_inference_steps=4)
    dj.sample(toy_model, jax.random.key(0), (2, 3), num_inference_steps=4)
    dj.img2img(toy_model, x, x, strength=0.5, num_inference_steps=4)
    assert "DEIS" not in capsys.readouterr().err


def test_check_finite_names_the_model_output_step_when_the_sample_stays_finite():
    """An inf in a sample prediction is clipped by thresholding (s = median of |x0|, finite), so only
    the model output is non-finite: the error names its step, not the sample's (none)."""
    config = dj.DEISConfig(prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.5)
    bad_t = dj.set_timesteps(config, 6, (1, 16)).timesteps[3]

    def model(x, t):
        return jnp.where((t == bad_t) & (jnp.arange(16) == 0), jnp.inf, 0.5 * x)

    x = jax.random.normal(jax.random.key(0), (1, 16))
    assert np.isfinite(dj.sample_from_noise(model, x, config=config, num_inference_steps=6)).all()
    with pytest.raises(dj.NonFiniteError, match=r"the model output became non-finite .* at step 3 "):
        dj.sample_from_noise(model, x, config=config, num_inference_steps=6, check_finite=True)
