"""FlaxDEISMultistepScheduler in diffusers 0.39's own FlaxStableDiffusionPipeline (the last release with Flax
pipelines), with tiny randomly initialised UNet, VAE and CLIP text encoder: its images equal the same denoising loop
run through `deis_jax.sample_from_noise`, with `jit=False` (one `_generate` call) and `jit=True` (pmapped over the
host devices, one prng seed each).

The pipeline is saved with diffusers' own FlaxPNDMScheduler and Stable Diffusion 1.5's scheduler config, loaded
with `FlaxStableDiffusionPipeline.from_pretrained`, and switched to DEIS by the README's one line.
"""

import functools
import json
import warnings

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxAutoencoderKL, FlaxPNDMScheduler, FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel
from diffusers.schedulers.scheduling_utils_flax import FlaxKarrasDiffusionSchedulers
from flax.jax_utils import replicate
from flax.training.common_utils import shard
from transformers import CLIPTextConfig, FlaxCLIPTextModel

import deis_jax
from deis_jax import FlaxDEISMultistepScheduler
from helpers import SD15

STEPS, SIZE, TOKENS, GUIDANCE = 8, 16, 16, 5.0
# The pipeline runs its text encoder and VAE op by op (jit=False) or in one pmapped program (jit=True), the
# reference in one jitted program: float32 rounding differs (1.3e-6 measured). The images are sensitive to the
# solver far above this: DEIS order 1 or 3 instead of 2 moves them by 0.09 or 0.02, lower_order_final=False by 5e-4.
ATOL = 1e-5


def random_params(module_init, seed):
    """Parameters of the shapes `module_init(key)` gives, drawn from numpy: kernels N(0, 1/fan_in), norm scales 1,
    biases N(0, 0.01), embeddings N(0, 1). (Tracing the shapes is instant; running the Flax initialisers takes a
    minute on two CPU cores.)"""
    rng = np.random.RandomState(seed)

    def leaf(path, shape_dtype):
        shape, name = shape_dtype.shape, path[-1].key
        if name == "scale":
            return np.ones(shape, np.float32)
        if name == "bias":
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        scale = 1.0 / np.sqrt(np.prod(shape[:-1])) if name == "kernel" else 1.0
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(module_init, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(pipeline, params): a tiny pipeline saved with FlaxPNDMScheduler, loaded, switched to DEIS."""
    unet = FlaxUNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=32)
    vae = FlaxAutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            latent_channels=4)
    text_encoder = FlaxCLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37,
                                                    num_attention_heads=4, num_hidden_layers=2,
                                                    max_position_embeddings=TOKENS), _do_init=False)
    pndm = FlaxPNDMScheduler.from_config(SD15)
    params = {"unet": random_params(unet.init_weights, 0), "vae": random_params(vae.init_weights, 1),
              "text_encoder": random_params(functools.partial(text_encoder.init_weights, input_shape=(1, TOKENS)), 2),
              "scheduler": pndm.create_state()}
    # No tokenizer (prompt and negative prompt ids are given), no safety checker.
    original = FlaxStableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                           scheduler=pndm, safety_checker=None, feature_extractor=None)
    folder = tmp_path_factory.mktemp("pipeline")
    original.save_pretrained(folder, params=params)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15))

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder, tokenizer=None, safety_checker=None,
                                                               feature_extractor=None)
    assert isinstance(pipe.scheduler, FlaxPNDMScheduler)
    # The README's one-line change:
    pipe.scheduler, params["scheduler"] = FlaxDEISMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    return pipe, params


def prompts(count, seed):
    return np.random.RandomState(seed).randint(0, 100, (count, TOKENS)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def reference_images(pipe, config, params, prompt_ids, neg_prompt_ids, prng_seed):
    """The pipeline's `_generate` rebuilt around `deis_jax.sample_from_noise(config=config)`: the same text
    embeddings, latents drawn from `prng_seed` the way `_generate` draws them, the UNet with classifier-free guidance
    as model_fn, VAE decode."""
    embed = lambda ids: pipe.text_encoder(ids, params=params["text_encoder"])[0]  # noqa: E731
    context = jnp.concatenate([embed(neg_prompt_ids), embed(prompt_ids)])
    batch = prompt_ids.shape[0]
    latents = jax.random.normal(prng_seed, (batch, pipe.unet.config.in_channels, SIZE // pipe.vae_scale_factor,
                                            SIZE // pipe.vae_scale_factor), jnp.float32)

    def model_fn(x, t):
        eps = pipe.unet.apply({"params": params["unet"]}, jnp.concatenate([x, x]), jnp.broadcast_to(t, (2 * batch,)),
                              encoder_hidden_states=context).sample
        uncond, cond = jnp.split(eps, 2)
        return uncond + GUIDANCE * (cond - uncond)

    latents = deis_jax.sample_from_noise(model_fn, latents, config=config, num_inference_steps=STEPS)
    image = pipe.vae.apply({"params": params["vae"]}, latents / pipe.vae.config.scaling_factor,
                           method=pipe.vae.decode).sample
    return (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)


def assert_images_match(images, expected):
    assert images.shape == expected.shape
    # Not a vacuous match: most pixels are inside (0, 1), away from the clip.
    assert np.mean((expected > 0.01) & (expected < 0.99)) > 0.5
    np.testing.assert_allclose(images, expected, rtol=0, atol=ATOL)


def test_loaded_scheduler(pipeline):
    pipe, params = pipeline
    assert isinstance(pipe.scheduler, FlaxDEISMultistepScheduler)
    assert pipe.scheduler.config == deis_jax.DEISConfig(beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012, steps_offset=1)
    assert float(params["scheduler"].init_noise_sigma) == 1.0


def test_pipeline_equals_sample_from_noise(pipeline):
    """jit=False: `_generate` runs once, its denoising loop a `jax.lax.fori_loop` over our `step`."""
    pipe, params = pipeline
    ids, neg_ids, seed = prompts(1, 0), prompts(1, 1), jax.random.PRNGKey(3)
    images = pipe(ids, params, seed, STEPS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                  neg_prompt_ids=neg_ids).images
    assert_images_match(images, np.asarray(reference_images(pipe, pipe.scheduler.config, params, ids, neg_ids, seed)))


def test_pipeline_jit_equals_sample_from_noise(pipeline):
    """jit=True: `_generate` pmapped over the host devices, the scheduler state replicated with the other params,
    one prompt and prng seed per device."""
    pipe, params = pipeline
    devices = jax.local_device_count()
    ids, neg_ids = prompts(devices, 2), prompts(devices, 3)
    seeds = jax.random.split(jax.random.PRNGKey(4), devices)
    images = pipe(shard(ids), replicate(params), seeds, STEPS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                  neg_prompt_ids=shard(neg_ids), jit=True).images
    assert images.shape[:2] == (devices, 1)
    for d in range(devices):
        expected = reference_images(pipe, pipe.scheduler.config, params, ids[d:d + 1], neg_ids[d:d + 1], seeds[d])
        assert_images_match(images[d], np.asarray(expected))
    if devices > 1:  # the devices drew different latents
        assert np.abs(images[0] - images[1]).max() > 0.1


def test_compatibles_are_diffusers_flax_schedulers(tmp_path):
    """`compatibles` names diffusers' FlaxKarrasDiffusionSchedulers, and each one's saved config loads quietly."""
    names = [e.name for e in FlaxKarrasDiffusionSchedulers]
    assert sorted(FlaxDEISMultistepScheduler.compatibles) == sorted(names)
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    for name in names:
        getattr(diffusers, name)(**betas).save_config(tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scheduler, _ = FlaxDEISMultistepScheduler.from_pretrained(tmp_path / name)
        assert scheduler.config == deis_jax.DEISConfig(**betas), name
