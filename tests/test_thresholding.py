"""Dynamic thresholding: the ratio's end points against diffusers, and which axes index examples
(`thresholding_batch_axes`), so that vmapped and batched calls agree."""

import dataclasses
import re

import jax
import numpy as np
import pytest

import deis_jax as dj
from helpers import assert_float32_parity, deis_trajectory, diffusers_trajectory, initial_noise, toy_model

# sample_max_value > 1 puts s = quantile(|x0|) strictly inside (1, max): which values share a quantile matters.
CONFIG = dj.DEISConfig(thresholding=True, sample_max_value=3.0)
EXAMPLE = (4, 8, 8)  # one example, (C, H, W)
KEYS = jax.random.split(jax.random.key(0), 3)
STEPS = 10


def _sample(config, shape):
    """The README pattern: one jitted sampler per key, vmapped over keys."""
    return jax.jit(jax.vmap(lambda k: dj.sample(toy_model, k, shape, config=config, num_inference_steps=STEPS)))(KEYS)


def _batched(noise, config=CONFIG):
    """One call on the whole (examples, ...) batch: diffusers' convention, thresholding_batch_axes=1."""
    return jax.jit(lambda z: dj.sample_from_noise(toy_model, z, config=config, num_inference_steps=STEPS))(noise)


def _noise(shape):
    return jax.vmap(lambda k: jax.random.normal(k, shape))(KEYS)  # what dj.sample draws from each key


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_vmap_over_examples_with_batch_axes_0_equals_batched_call():
    noise = _noise(EXAMPLE)
    batched = _batched(noise)
    vmapped = _sample(dataclasses.replace(CONFIG, thresholding_batch_axes=0), EXAMPLE)
    np.testing.assert_allclose(vmapped, batched, rtol=1e-5, atol=1e-5)
    # Thresholding is active, and with the default each channel of a vmapped example is thresholded alone.
    assert _max_abs(batched, _batched(noise, dataclasses.replace(CONFIG, thresholding=False))) > 1e-2
    assert _max_abs(_sample(CONFIG, EXAMPLE), batched) > 1e-3


def test_vmap_over_keys_of_batches_with_default_equals_batched_call():
    per_key = (2, *EXAMPLE)
    vmapped = _sample(CONFIG, per_key)
    batched = _batched(_noise(per_key).reshape(-1, *EXAMPLE))
    np.testing.assert_allclose(vmapped.reshape(batched.shape), batched, rtol=1e-5, atol=1e-5)


def test_two_batch_axes_equal_batched_call():
    noise = _noise((2, *EXAMPLE))  # (keys, batch, C, H, W) in one call
    two_axes = _batched(noise, dataclasses.replace(CONFIG, thresholding_batch_axes=2))
    batched = _batched(noise.reshape(-1, *EXAMPLE))
    np.testing.assert_allclose(two_axes.reshape(batched.shape), batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axes,shape", [(1, (3, 16)), (0, (3, 16)), (0, (2, 3, 4)), (1, (2, 3, 4)), (2, (2, 3, 4))])
def test_threshold_takes_one_quantile_per_example(axes, shape):
    """x0 = m (sample prediction); reference: numpy's quantile over each example's remaining axes."""
    config = dj.DEISConfig(prediction_type="sample", thresholding=True, sample_max_value=2.0,
                           dynamic_thresholding_ratio=0.9, thresholding_batch_axes=axes)
    state = dj.set_timesteps(config, 10, shape)
    x, m = initial_noise(shape), 3.0 * initial_noise(shape, seed=1)
    flat = m.reshape(*shape[:axes], -1)
    s = np.clip(np.quantile(np.abs(flat), 0.9, axis=-1, keepdims=True), 1.0, 2.0)
    x0 = (np.clip(flat, -s, s) / s).reshape(shape)
    expected = (x - float(state.alpha_t[0]) * x0) / float(state.sigma_t[0])
    np.testing.assert_allclose(dj.convert_model_output(state, m, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axes,shape", [(1, (16,)), (2, (3, 16))])
def test_too_few_sample_dims_rejected(axes, shape):
    config = dataclasses.replace(CONFIG, thresholding_batch_axes=axes)
    match = rf"^DEISConfig.thresholding_batch_axes={axes} needs .*{re.escape(str(shape))}"
    with pytest.raises(ValueError, match=match):
        dj.sample(toy_model, KEYS[0], shape, config=config, num_inference_steps=3)


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_ratio_end_points_match_diffusers(ratio):
    """torch.quantile at 0 is the minimum of |x0|, at 1 the maximum; diffusers runs both."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    kwargs = {"thresholding": True, "dynamic_thresholding_ratio": ratio, "sample_max_value": 3.0}
    x0 = initial_noise((2, *EXAMPLE))
    _, _, ref32 = diffusers_trajectory(kwargs, 8, x0)
    _, _, ref64 = diffusers_trajectory(kwargs, 8, x0, double=True)
    _, ours = deis_trajectory(dj.DEISConfig(**kwargs), 8, x0)
    assert_float32_parity(ours, ref32, ref64)
    _, plain = deis_trajectory(dj.DEISConfig(), 8, x0)
    assert _max_abs(ours[-1], plain[-1]) > 1e-2  # thresholding is active
