"""The scan sampler: equal to a Python loop, traced once, under jit / vmap / grad; errors (devices: test_sharding)."""

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
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 1000}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"shape": (2, 0)}, "shape"),
    ({"shape": "2x3"}, "shape"),
    ({"mu": 0.5}, "mu"),
    ({"begin_index": 10}, "begin_index"),
])
def test_bad_call_arguments(kwargs, match):
    args = dict(config=dj.DEISConfig(), num_inference_steps=10, shape=(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dj.set_timesteps(args.pop("config"), args.pop("num_inference_steps"), args.pop("shape"), **args)


def test_model_output_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"model_output.shape=\(2, 4\).*\(2, 3\)"):
        dj.sample(lambda x, t: jnp.zeros((2, 4)), jax.random.key(0), (2, 3), num_inference_steps=5)


def test_config_must_be_a_deis_config():
    with pytest.raises(ValueError, match="config"):
        dj.set_timesteps({"solver_order": 2}, 10, (1,))
