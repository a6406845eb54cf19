"""FlaxDEISMultistepScheduler: diffusers' (<= 0.39) Flax scheduler protocol over deis_jax, without diffusers.

`pipeline_loop` is the denoising loop of diffusers 0.39's `FlaxStableDiffusionPipeline._generate`, line for line
(classifier-free guidance on a concatenated batch, the timestep read as `jnp.array(state.timesteps, jnp.int32)[i]`
from the traced index of a `jax.lax.fori_loop`); tests/flax039 runs the real pipeline in its own venv.
"""

import dataclasses
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax as dj
from deis_jax import DEISConfig, FlaxDEISMultistepScheduler
from helpers import SD15, initial_noise, toy_model

SHAPE = (2, 4, 8, 8)  # latents (batch, channels, height, width)
CONTEXT = jnp.array([0.0, 0.0, 1.0, -0.5])  # per row of the doubled batch: unconditional, then conditional
GUIDANCE = 4.0
SD = DEISConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)


def unet(x, timestep, context):
    """A toy conditional UNet: one int32 timestep and one context value per row."""
    return toy_model(x, timestep[:, None, None, None]) + 0.3 * context[:, None, None, None] * jnp.cos(x)


def pipeline_loop(scheduler, scheduler_params, latents, num_inference_steps):
    """FlaxStableDiffusionPipeline._generate's loop (diffusers 0.39), with `unet` for the UNet."""

    def loop_body(step, args):
        latents, scheduler_state = args
        latents_input = jnp.concatenate([latents] * 2)
        t = jnp.array(scheduler_state.timesteps, dtype=jnp.int32)[step]
        timestep = jnp.broadcast_to(t, latents_input.shape[0])
        latents_input = scheduler.scale_model_input(scheduler_state, latents_input, t)
        noise_pred = unet(latents_input, jnp.array(timestep, dtype=jnp.int32), CONTEXT)
        noise_pred_uncond, noise_prediction_text = jnp.split(noise_pred, 2, axis=0)
        noise_pred = noise_pred_uncond + GUIDANCE * (noise_prediction_text - noise_pred_uncond)
        latents, scheduler_state = scheduler.step(scheduler_state, noise_pred, t, latents).to_tuple()
        return latents, scheduler_state

    scheduler_state = scheduler.set_timesteps(scheduler_params, num_inference_steps=num_inference_steps,
                                              shape=latents.shape)
    latents = latents * scheduler_params.init_noise_sigma
    latents, _ = jax.lax.fori_loop(0, num_inference_steps, loop_body, (latents, scheduler_state))
    return latents


def guided_model(x, t):
    """The same UNet and guidance as a deis_jax model_fn(x, t)."""
    eps = unet(jnp.concatenate([x, x]), jnp.broadcast_to(t, (2 * x.shape[0],)), CONTEXT)
    uncond, cond = jnp.split(eps, 2)
    return uncond + GUIDANCE * (cond - uncond)


def run_pipeline_loop(mode, scheduler, latents, n):
    params = scheduler.create_state()
    if mode == "eager":  # jit=False: the fori_loop body is still traced
        return pipeline_loop(scheduler, params, latents, n)
    if mode == "jit":
        return jax.jit(pipeline_loop, static_argnums=(0, 3))(scheduler, params, latents, n)
    # jit=True: pmap over the devices, static scheduler and step count, params replicated (flax's replicate)
    run = jax.pmap(pipeline_loop, in_axes=(None, 0, 0, None), static_broadcasted_argnums=(0, 3))
    params = jax.tree.map(lambda leaf: jnp.stack([leaf] * jax.local_device_count()), params)
    return run(scheduler, params, latents[None], n)[0]


CONFIGS = [
    (SD, 8),
    (dataclasses.replace(SD, solver_order=3, prediction_type="v_prediction", timestep_spacing="trailing"), 15),
    (DEISConfig(solver_type="tab", solver_order=4, timestep_spacing="quadratic", lower_order_final=False), 10),
    (DEISConfig(solver_type="ipndm", solver_order=4), 12),
    (DEISConfig(solver_type="rhoab", solver_order=3, use_karras_sigmas=True), 9),
    (DEISConfig(solver_order=3, algorithm_type="data_prediction", final_sigmas_type="zero"), 6),
    (DEISConfig(prediction_type="sample", thresholding=True, sample_max_value=1.5), 7),
    (DEISConfig(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), 8),
]


@pytest.mark.parametrize("mode", ["eager", "jit", "pmap"])
@pytest.mark.parametrize("config,n", CONFIGS[:1])
def test_pipeline_loop_equals_sample_from_noise_modes(config, n, mode):
    """The pipeline's two call paths (jit=False, jit=True's pmap) and a plain jit."""
    scheduler = FlaxDEISMultistepScheduler(config)
    latents = jnp.asarray(initial_noise(SHAPE))
    out = run_pipeline_loop(mode, scheduler, latents, n)
    expected = jax.jit(lambda x: dj.sample_from_noise(guided_model, x, config=config, num_inference_steps=n))(latents)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config,n", CONFIGS[1:])
def test_pipeline_loop_equals_sample_from_noise(config, n):
    """Every solver type but rhork, prediction types, grids, the data form and a final step to 0."""
    scheduler = FlaxDEISMultistepScheduler(config)
    latents = jnp.asarray(initial_noise(SHAPE, seed=1))
    out = run_pipeline_loop("jit", scheduler, latents, n)
    expected = jax.jit(lambda x: dj.sample_from_noise(guided_model, x, config=config, num_inference_steps=n))(latents)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver_type", [s for s in dj.SOLVER_TYPES if s != "rhork"])
@pytest.mark.parametrize("options", [{}, {"use_flow_sigmas": True}, {"use_karras_sigmas": True},
                                     {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
                                     {"timestep_spacing": "quadratic"}, {"final_sigmas_type": "zero"}])
def test_timesteps_are_int32(solver_type, options):
    """The pipelines cast `state.timesteps` to int32: exact for every configuration the scheduler accepts."""
    scheduler = FlaxDEISMultistepScheduler(DEISConfig(solver_type=solver_type, **options))
    state = scheduler.set_timesteps(scheduler.create_state(), 10, SHAPE)
    assert state.timesteps.dtype == jnp.int32


def test_step_return_dict_and_state():
    scheduler = FlaxDEISMultistepScheduler(SD)
    x = jnp.asarray(initial_noise(SHAPE))
    state = scheduler.set_timesteps(scheduler.create_state(), 5, SHAPE)
    t = state.timesteps[0]
    out = scheduler.step(state, guided_model(x, t), t, x)
    prev, new_state = scheduler.step(state, guided_model(x, t), t, x, return_dict=False)
    expected, expected_state = dj.step(state, guided_model(x, t), t, x)
    np.testing.assert_array_equal(out.prev_sample, expected)
    np.testing.assert_array_equal(prev, expected)
    assert out.to_tuple()[0] is out.prev_sample and out.to_tuple()[1] is out.state
    assert type(out.to_tuple()) is tuple
    assert int(out.state.step_index) == int(new_state.step_index) == int(expected_state.step_index) == 1
    assert float(scheduler.create_state().init_noise_sigma) == scheduler.init_noise_sigma == 1.0
    assert scheduler.order == 1


def test_add_noise_equals_closed_form():
    """alpha_bar from SD's scaled_linear betas in float64 numpy: sqrt(a_t) x0 + sqrt(1 - a_t) noise, one t per row."""
    scheduler = FlaxDEISMultistepScheduler(SD)
    state = scheduler.set_timesteps(scheduler.create_state(), 10, SHAPE)
    x0, noise = initial_noise(SHAPE, seed=2), initial_noise(SHAPE, seed=3)
    t = state.timesteps[jnp.array([2, 7])]
    out = scheduler.add_noise(state, x0, noise, t)
    alpha_bar = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)[np.asarray(t)][:, None, None, None]
    np.testing.assert_allclose(out, np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * noise, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, dj.add_noise(state, x0, noise, t))


# Configs as diffusers 0.39 saves them (every __init__ argument; the values of each class's defaults), with
# SD's betas, and the DEISConfig they give.
SAVED = {
    "FlaxDDIMScheduler": {"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True, "steps_offset": 0,
                          "prediction_type": "epsilon"},
    "FlaxDDPMScheduler": {"variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon"},
    "FlaxPNDMScheduler": {"skip_prk_steps": False, "set_alpha_to_one": False, "steps_offset": 0,
                          "prediction_type": "epsilon"},
    "FlaxLMSDiscreteScheduler": {"prediction_type": "epsilon"},
    "FlaxDPMSolverMultistepScheduler": {"solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
                                        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
                                        "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                        "lower_order_final": True, "timestep_spacing": "linspace"},
    "FlaxEulerDiscreteScheduler": {"prediction_type": "epsilon", "timestep_spacing": "linspace"},
}
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "trained_betas": None}


def test_compatibles_are_diffusers_flax_schedulers():
    assert set(FlaxDEISMultistepScheduler.compatibles) == set(SAVED)


@pytest.mark.parametrize("class_name", sorted(SAVED))
def test_from_config_and_from_pretrained_take_compatible_configs(class_name, tmp_path, recwarn):
    saved = {"_class_name": class_name, "_diffusers_version": "0.39.0", **SD_BETAS, **SAVED[class_name]}
    expected = DEISConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(saved))
    assert FlaxDEISMultistepScheduler.from_config(saved).config == expected
    assert FlaxDEISMultistepScheduler.from_config(tmp_path / "scheduler" / "scheduler_config.json").config == expected
    scheduler, state = FlaxDEISMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert scheduler.config == expected and scheduler.dtype == jnp.float32
    assert isinstance(state, dj.FlaxDEISSchedulerState) and float(state.init_noise_sigma) == 1.0
    scheduler, _ = FlaxDEISMultistepScheduler.from_pretrained(str(tmp_path / "scheduler"))
    assert scheduler.config == expected
    assert not recwarn.list  # these are settings of diffusers' samplers: dropped quietly


def test_from_config_use_default_values_overrides_and_dtype():
    """Keys in `_use_default_values` were the source class's defaults: DEIS's apply (order 2, not 3);
    keyword arguments set fields over the config; `dtype` is that of the state."""
    saved = {"_class_name": "FlaxDPMSolverMultistepScheduler", "solver_order": 3, "prediction_type": "v_prediction",
             "timestep_spacing": "trailing", "_use_default_values": ["solver_order", "timestep_spacing"]}
    scheduler = FlaxDEISMultistepScheduler.from_config(saved)
    assert scheduler.config == DEISConfig(prediction_type="v_prediction")
    scheduler = FlaxDEISMultistepScheduler.from_config(SD15, dtype=jnp.bfloat16, solver_order=3, solver_type="tab")
    assert scheduler.config == dataclasses.replace(SD, solver_order=3, solver_type="tab")
    assert scheduler.create_state().init_noise_sigma.dtype == jnp.bfloat16
    # bfloat16 latents are updated in float32, as by deis_jax.set_timesteps(dtype=bfloat16)
    assert scheduler.set_timesteps(scheduler.create_state(), 4, SHAPE).model_outputs.dtype == jnp.float32


def test_from_pretrained_hub_id(tmp_path, monkeypatch):
    """A path that is not a directory is a Hub model id: huggingface_hub fetches its scheduler_config.json."""
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15))
    calls = []
    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = lambda *args, **kwargs: calls.append((args, kwargs)) or str(path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    scheduler, _ = FlaxDEISMultistepScheduler.from_pretrained("org/model", subfolder="scheduler", revision="main")
    assert calls == [(("org/model", "scheduler_config.json"), {"subfolder": "scheduler", "revision": "main"})]
    assert scheduler.config == SD


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"solver_type='rhork' is invalid for FlaxDEISMultistepScheduler: .*int32"):
        FlaxDEISMultistepScheduler(DEISConfig(solver_type="rhork"))
    with pytest.raises(ValueError, match=r"time_schedule='vp_linear' is invalid for FlaxDEISMultistepScheduler"):
        FlaxDEISMultistepScheduler(DEISConfig(time_schedule="vp_linear"))
    with pytest.raises(ValueError, match=r"solver_type='rhork' is invalid for FlaxDEISMultistepScheduler"):
        FlaxDEISMultistepScheduler.from_config(SD15, solver_type="rhork")
    with pytest.raises(ValueError, match=r"config=\{'beta_end': 0.01\} is invalid: must be a DEISConfig"):
        FlaxDEISMultistepScheduler({"beta_end": 0.01})
    for dtype in (jnp.int32, "nonsense"):
        with pytest.raises(ValueError, match=r"dtype=.* is invalid: must be a floating dtype"):
            FlaxDEISMultistepScheduler(SD, dtype=dtype)
    with pytest.raises(ValueError, match=r"\['solver_ordr'\] are invalid keyword arguments: each must be a DEISConfig"):
        FlaxDEISMultistepScheduler.from_config(SD15, solver_ordr=3)
    with pytest.raises(ValueError, match=r"DEISConfig.solver_order=9 is invalid"):
        FlaxDEISMultistepScheduler.from_config(SD15, solver_order=9)
    with pytest.raises(ValueError, match=r"scheduler_config.json' does not exist; .*subfolder='nope'"):
        FlaxDEISMultistepScheduler.from_pretrained(tmp_path, subfolder="nope")
    with pytest.raises(ValueError, match=r"\['revision'\] are invalid for the local directory"):
        FlaxDEISMultistepScheduler.from_pretrained(tmp_path, revision="main")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ValueError, match=r"pretrained_model_name_or_path='org/model' is invalid: .*huggingface_hub"):
        FlaxDEISMultistepScheduler.from_pretrained("org/model", subfolder="scheduler")

    scheduler = FlaxDEISMultistepScheduler(SD)
    fresh = scheduler.create_state()
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"set_timesteps: state=dict is invalid: .*params\['scheduler'\]"):
        scheduler.set_timesteps({"init_noise_sigma": 1.0}, 10, SHAPE)  # e.g. another scheduler's state
    with pytest.raises(ValueError, match=r"step: state=FlaxDEISSchedulerState is invalid: .*call set_timesteps"):
        scheduler.step(fresh, x, 999, x)
    with pytest.raises(ValueError, match=r"add_noise: state=FlaxDEISSchedulerState is invalid: .*deis_jax.img2img"):
        scheduler.add_noise(fresh, x, x, jnp.array([999]))
    with pytest.raises(ValueError, match=r"num_inference_steps=0 is invalid"):
        scheduler.set_timesteps(fresh, 0, SHAPE)
    with pytest.raises(ValueError, match=r"shape=\[2, 4.0\] is invalid"):
        scheduler.set_timesteps(fresh, 10, [2, 4.0])
