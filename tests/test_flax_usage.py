"""In a Flax user's hands: NNX and Linen models, guidance, img2img, progress, check_finite, gradients."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import deis_jax as dj
from helpers import initial_noise, toy_model


class TinyNNX(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 2, kernel_size=(3, 3), rngs=rngs)
        self.time = nnx.Linear(1, 2, rngs=rngs)

    def __call__(self, x, t):
        emb = self.time(jnp.reshape(t / 1000.0, (1, 1)).astype(x.dtype))
        return self.conv(x) + emb[:, None, None, :]


class TinyLinen(nn.Module):
    @nn.compact
    def __call__(self, x, t):
        return nn.Conv(2, (3, 3))(x) * (1.0 + t / 1000.0)


def test_nnx_module_under_nnx_jit_and_split_merge():
    model = TinyNNX(nnx.Rngs(0))

    @nnx.jit
    def run(model, key):
        return dj.sample(model, key, (2, 4, 4, 2), num_inference_steps=8)

    a = run(model, jax.random.key(1))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run_split(state, key):
        return dj.sample(nnx.merge(graphdef, state), key, (2, 4, 4, 2), num_inference_steps=8)

    np.testing.assert_allclose(a, run_split(state, jax.random.key(1)), rtol=1e-5, atol=1e-6)
    assert np.isfinite(a).all()


def test_linen_apply_closure():
    model = TinyLinen()
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)), 0)
    run = jax.jit(lambda p, k: dj.sample(lambda x, t: model.apply(p, x, t), k, (2, 4, 4, 2), num_inference_steps=8))
    out = run(params, jax.random.key(1))
    assert out.shape == (2, 4, 4, 2) and np.isfinite(out).all()


def test_classifier_free_guidance_one_batched_call():
    calls = []

    def model_fn(x, t, cond):
        calls.append(x.shape)
        return jnp.tanh(x) + cond[:, None]

    guided = dj.classifier_free_guidance(model_fn, guidance_scale=7.5)
    x, cond, uncond = jnp.ones((3, 4)), jnp.array([1.0, 2.0, 3.0]), jnp.zeros(3)
    out = guided(x, 500, cond, uncond)
    assert calls == [(6, 4)]
    u, c = jnp.tanh(x) + uncond[:, None], jnp.tanh(x) + cond[:, None]
    np.testing.assert_allclose(out, u + 7.5 * (c - u), rtol=1e-6)
    sampled = dj.sample(lambda x, t: guided(x, t, cond, uncond), jax.random.key(0), (3, 4), num_inference_steps=5)
    assert np.isfinite(sampled).all()


def test_guidance_rescale_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    rng = np.random.RandomState(0)
    cond, guided = rng.randn(2, 3, 4, 4).astype(np.float32), 3 * rng.randn(2, 3, 4, 4).astype(np.float32)
    ref = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale=0.7).numpy()
    ours = dj.guidance.rescale_guidance(jnp.asarray(guided), jnp.asarray(cond), 0.7)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7, 1.0])
def test_classifier_free_guidance_rescale_over_its_whole_range(guidance_rescale):
    """Through the wrapper, end points of [0, 1] included: with g = u + s (c - u),
    out = phi g std(c) / std(g) + (1 - phi) g, std per sample (Lin et al. 2023, eq. 16)."""
    def model_fn(x, t, cond):
        return jnp.tanh(x) * cond[:, None, None]

    x = jnp.asarray(initial_noise((2, 3, 4)))
    cond, uncond = jnp.array([1.0, 2.0]), jnp.array([0.5, -0.5])
    out = dj.classifier_free_guidance(model_fn, 5.0, guidance_rescale=guidance_rescale)(x, 10, cond, uncond)
    u, c = (np.tanh(np.asarray(x)) * np.asarray(v)[:, None, None] for v in (uncond, cond))
    g = u + 5.0 * (c - u)
    ratio = c.std(axis=(1, 2), keepdims=True) / g.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, guidance_rescale * g * ratio + (1 - guidance_rescale) * g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("guidance_rescale", [np.nextafter(0.0, -1.0), -0.1, np.nextafter(1.0, 2.0), 1.5, np.nan])
def test_classifier_free_guidance_rescale_outside_range(guidance_rescale):
    with pytest.raises(ValueError, match="guidance_rescale"):
        dj.classifier_free_guidance(lambda x, t, c: x, 2.0, guidance_rescale=guidance_rescale)


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_matches_diffusers(strength):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    n, config = 20, dj.DEISConfig(solver_order=3)
    image, noise = initial_noise((2, 3, 4, 4)), initial_noise((2, 3, 4, 4), seed=1)
    sched = diffusers.DEISMultistepScheduler(solver_order=3)
    sched.set_timesteps(n)
    t_start = n - min(int(n * strength), n)
    timesteps = sched.timesteps[t_start:]
    sched.set_begin_index(t_start)
    x = sched.add_noise(torch.from_numpy(image), torch.from_numpy(noise), timesteps[:1])
    for t in timesteps:
        x = sched.step(torch.from_numpy(np.asarray(toy_model(x.numpy(), float(t), xp=np))), t, x).prev_sample
    ours = dj.img2img(toy_model, image, noise, strength=strength, config=config, num_inference_steps=n)
    np.testing.assert_allclose(ours, x.numpy(), rtol=1e-4, atol=1e-4 * np.abs(x.numpy()).max())


@pytest.mark.parametrize("strength", [0.01, 0.0999, 0.0, -0.5, float(np.nextafter(1.0, 2.0)), 1.5, float("nan")])
def test_img2img_bad_strength(strength):
    """Outside (0, 1], or so small that N * strength rounds down to no step."""
    with pytest.raises(ValueError, match="strength"):
        dj.img2img(toy_model, jnp.ones(3), jnp.ones(3), strength=strength, num_inference_steps=10)


def test_img2img_smallest_strength_takes_one_ddim_step():
    """strength = 1 / N keeps one step: noise to sigma_{N-1}, then x' = alpha' x0 + sigma' eps with
    x0 = (x - sigma eps) / alpha (lower_order_final makes the last step first order)."""
    image, noise = initial_noise((2, 3)), initial_noise((2, 3), seed=1)
    out = dj.img2img(toy_model, image, noise, strength=0.1, num_inference_steps=10)
    state = dj.set_timesteps(dj.DEISConfig(), 10, (2, 3))
    s = np.asarray(state.sigmas)[-2:].astype(np.float64)
    (a, a1), (sig, sig1) = 1 / np.sqrt(1 + s**2), s / np.sqrt(1 + s**2)
    x = a * image + sig * noise
    eps = np.asarray(toy_model(jnp.asarray(x, jnp.float32), state.timesteps[-1]))
    np.testing.assert_allclose(out, a1 * (x - sig * eps) / a + sig1 * eps, rtol=1e-5, atol=1e-5)


def test_progress_bar_does_not_change_results(capsys):
    run = functools.partial(dj.sample, toy_model, jax.random.key(0), (2, 3), num_inference_steps=12)
    quiet, shown = jax.jit(run)(), jax.jit(functools.partial(run, progress=True))()
    jax.effects_barrier()
    np.testing.assert_array_equal(quiet, shown)
    assert "12/12" in capsys.readouterr().err


PROGRESS_RUNS = {  # (jitted call with progress=True, steps it takes)
    "sample": (lambda: dj.sample(toy_model, jax.random.key(0), (2, 3), num_inference_steps=12, progress=True), 12),
    "sample_from_noise": (lambda: dj.sample_from_noise(toy_model, jnp.ones((2, 3)), num_inference_steps=12,
                                                       begin_index=4, progress=True), 8),
    "img2img": (lambda: dj.img2img(toy_model, jnp.ones((2, 3)), jnp.zeros((2, 3)), strength=0.5,
                                   num_inference_steps=12, progress=True), 6),
}


@pytest.mark.parametrize("name", PROGRESS_RUNS)
def test_progress_bar_on_every_call_of_a_jitted_sampler(name, capsys):
    """Each call of the same compiled sampler shows its own bar, counting up to its number of steps."""
    fn, steps = PROGRESS_RUNS[name]
    run = jax.jit(fn)
    for _ in range(2):
        jax.block_until_ready(run())
        jax.effects_barrier()
    bars = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n") if "DEIS" in line]
    assert len(bars) == 2 and all(f" {steps}/{steps} " in bar for bar in bars), bars


def _nan_below_500(x, t):  # NaN once the timestep drops below 500
    return jnp.where(t < 500, jnp.nan, toy_model(x, t))


def _ignores_x(x, t):  # finite whatever x is: a NaN in the noise shows up in the sample only
    return jnp.zeros_like(x) + t / 1000.0


def _raise_with(mode, fn):
    """Call fn eagerly, or under jit with checkify in either order, raising any check failure."""
    if mode == "eager":
        return fn()
    checked = checkify.checkify(jax.jit(fn)) if mode == "checkify_of_jit" else jax.jit(checkify.checkify(fn))
    err, out = checked()
    err.throw()
    return out


@pytest.mark.parametrize("mode", ["eager", "checkify_of_jit", "jit_of_checkify"])
@pytest.mark.parametrize("case", ["model output", "sample"])
def test_check_finite_names_the_first_bad_step(mode, case):
    timesteps = np.asarray(dj.set_timesteps(dj.DEISConfig(), 20, (2, 3)).timesteps)
    if case == "model output":  # the first step whose timestep is below 500
        model_fn, noise, first = _nan_below_500, initial_noise((2, 3)), int(np.argmax(timesteps < 500))
    else:  # NaN noise with a model that ignores x: the sample is NaN after step 0, the output never
        model_fn, noise, first = _ignores_x, initial_noise((2, 3)).copy(), 0
        noise[1, 2] = np.nan
    run = functools.partial(dj.sample_from_noise, model_fn, noise, num_inference_steps=20, check_finite=True)
    message = f"^the {case} became non-finite \\(NaN or inf\\) at step {first} \\(timestep {timesteps[first]}\\)"
    with pytest.raises(dj.NonFiniteError, match=message) as info:
        _raise_with(mode, run)
    assert info.type is dj.NonFiniteError and dj.NonFiniteError is checkify.JaxRuntimeError


@pytest.mark.parametrize("mode", ["eager", "checkify_of_jit", "jit_of_checkify"])
def test_check_finite_passes_finite_runs_unchanged(mode):
    run = functools.partial(dj.sample, toy_model, jax.random.key(0), (2, 3), num_inference_steps=20)
    checked = _raise_with(mode, functools.partial(run, check_finite=True))
    np.testing.assert_array_equal(checked, jax.jit(run)())


def test_check_finite_under_plain_jit_asks_for_checkify():
    run = functools.partial(dj.sample, toy_model, jax.random.key(0), (2, 3), num_inference_steps=5, check_finite=True)
    with pytest.raises(ValueError, match="checkify.checkify"):
        jax.jit(run)()


def test_check_finite_off_adds_no_check_or_callback():
    pattern = re.compile(r"\b(check|\w*callback)\[")
    jaxpr = {flag: str(jax.make_jaxpr(functools.partial(dj.sample, toy_model, shape=(2, 3), num_inference_steps=5,
                                                        check_finite=flag))(jax.random.key(0)))
             for flag in (False, True)}
    assert pattern.search(jaxpr[True]) and not pattern.search(jaxpr[False])


@pytest.mark.parametrize("name", ["sample_from_noise", "img2img"])
def test_check_finite_through_every_sampler(name):
    model_fn = _nan_below_500
    first = int(np.argmax(np.asarray(dj.set_timesteps(dj.DEISConfig(), 20, (2, 3)).timesteps) < 500))
    x = jnp.ones((2, 3))
    run = {"sample_from_noise": lambda f, **kw: dj.sample_from_noise(f, x, num_inference_steps=20, **kw),
           "img2img": lambda f, **kw: dj.img2img(f, x, x, strength=0.8, num_inference_steps=20, **kw)}[name]
    with pytest.raises(dj.NonFiniteError, match=f"model output became non-finite .* at step {first} "):
        jax.block_until_ready(run(model_fn, check_finite=True))
        jax.effects_barrier()
    assert np.isnan(run(model_fn)).all()  # unchecked, the NaN goes through silently
    jax.block_until_ready(run(toy_model, check_finite=True))
    jax.effects_barrier()


def test_grad_matches_finite_differences_in_float64_with_remat():
    with jax.enable_x64(True):
        noise = jnp.asarray(initial_noise((2, 3)).astype(np.float64))

        def loss(scale, noise, remat):
            model = lambda x, t: scale * toy_model(x, t)  # noqa: E731
            out = dj.sample_from_noise(model, noise, config=dj.DEISConfig(solver_order=3),
                                       num_inference_steps=10, remat=remat)
            return jnp.sum(out**2)

        g_scale, g_noise = jax.grad(loss, argnums=(0, 1))(0.7, noise, False)
        g_scale_remat, g_noise_remat = jax.grad(loss, argnums=(0, 1))(0.7, noise, True)
        eps = 1e-6
        fd_scale = (loss(0.7 + eps, noise, False) - loss(0.7 - eps, noise, False)) / (2 * eps)
        e = jnp.zeros_like(noise).at[1, 2].set(eps)
        fd_noise = (loss(0.7, noise + e, False) - loss(0.7, noise - e, False)) / (2 * eps)
    np.testing.assert_allclose(g_scale, fd_scale, rtol=1e-6)
    np.testing.assert_allclose(g_noise[1, 2], fd_noise, rtol=1e-6)
    np.testing.assert_allclose(g_scale_remat, g_scale, rtol=1e-10)
    np.testing.assert_allclose(g_noise_remat, g_noise, rtol=1e-10)


@pytest.mark.parametrize("name", ["sample", "sample_from_noise"])
def test_remat_bounds_backward_memory(name):
    """With remat the backward pass keeps the scan carry per step, not the model's activations."""
    def heavy_model(x, t, scale=1.01):  # 16 intermediate activations of x's size per step
        h = x
        for _ in range(16):
            h = jnp.sin(h) * scale
        return h

    def temp_bytes(remat):
        if name == "sample":  # gradient to a model parameter
            f = jax.grad(lambda c: jnp.sum(dj.sample(lambda x, t: heavy_model(x, t, c), jax.random.key(0), (64, 64),
                                                     num_inference_steps=50, remat=remat)))
            return jax.jit(f).lower(1.01).compile().memory_analysis().temp_size_in_bytes
        f = jax.grad(lambda z: jnp.sum(dj.sample_from_noise(heavy_model, z, num_inference_steps=50, remat=remat)))
        return jax.jit(f).lower(jnp.ones((64, 64))).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) < 0.5 * temp_bytes(False)
