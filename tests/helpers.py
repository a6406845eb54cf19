"""Shared test helpers: a smooth toy model and step loops for deis_jax and diffusers."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import deis_jax as dj

# Stable Diffusion 1.5's scheduler_config.json (written by diffusers 0.6): the keys a pipeline load starts from.
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
        "trained_betas": None}


def toy_model(x, t, xp=jnp):
    """A smooth, nonlinear, time-dependent stand-in for a network (numpy or jax.numpy)."""
    tt = xp.asarray(t, dtype=x.dtype) / 1000.0
    return xp.tanh(x) * (0.5 + tt) + 0.3 * xp.sin(3.0 * x + tt)


def initial_noise(shape, dtype=np.float32, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(dtype)


def deis_trajectory(config: dj.DEISConfig, n: int, x0: np.ndarray, mu=None):
    """Every intermediate sample of the jitted scan over `dj.step` with the toy model: [N, *shape]."""
    state = dj.set_timesteps(config, n, x0.shape, mu, dtype=x0.dtype)

    @jax.jit
    def run(state, x):
        def body(carry, t):
            x, state = carry
            x, state = dj.step(state, toy_model(x, t), t, x)
            return (x, state), x

        return jax.lax.scan(body, (x, state), state.timesteps)[1]

    return state, np.asarray(run(state, jnp.asarray(x0)))


def diffusers_trajectory(kwargs: dict, n: int, x0: np.ndarray, mu=None, double=False):
    """(timesteps, sigmas, samples [N, *shape]) of diffusers' DEISMultistepScheduler on the toy model."""
    import torch
    from diffusers import DEISMultistepScheduler

    sched = DEISMultistepScheduler(**kwargs)
    sched.set_timesteps(n, mu=mu)
    timesteps, sigmas = sched.timesteps.numpy().copy(), sched.sigmas.numpy().copy()
    dtype = np.float64 if double else np.float32
    if double:
        sched.sigmas = sched.sigmas.double()
    x = torch.from_numpy(x0.astype(dtype))
    out = []
    for t in sched.timesteps:
        m = torch.from_numpy(toy_model(x.numpy(), float(t), xp=np).astype(dtype))
        x = sched.step(m, t, x).prev_sample
        out.append(x.numpy().copy())
    return timesteps, sigmas, np.stack(out)


def dpmsolver_trajectory(kwargs: dict, n: int | None, x0: np.ndarray, timesteps=None, sigma_table=None,
                         noises=None):
    """(timesteps, sigmas, samples [N, *shape]) of diffusers' DPMSolverMultistepScheduler at solver_order=1.

    Its `step` casts the sample to float32. With `sigma_table` (float64, [N + 1]) the run is float64 on
    that table instead of its own (float32; equal up to float32 rounding), each step its order-1 `step`
    written out in diffusers' methods: `convert_model_output`, then `dpm_solver_first_order_update`.
    `noises` ([N, *shape]): the SDE algorithm types' per-step `variance_noise`.
    """
    import torch
    from diffusers import DPMSolverMultistepScheduler

    assert kwargs.get("solver_order") == 1, "the float64 path writes out the order-1 step"
    sched = DPMSolverMultistepScheduler(**kwargs)
    sched.set_timesteps(n, timesteps=timesteps)
    out_timesteps, sigmas = sched.timesteps.numpy().copy(), sched.sigmas.numpy().copy()
    double = sigma_table is not None
    if double:
        sched.sigmas = torch.from_numpy(np.array(sigma_table, np.float64))
    dtype = np.float64 if double else np.float32
    x = torch.from_numpy(x0.astype(dtype))
    out = []
    for i, t in enumerate(sched.timesteps):
        m = torch.from_numpy(toy_model(x.numpy(), float(t), xp=np).astype(dtype))
        z = None if noises is None else torch.from_numpy(np.asarray(noises[i], dtype))
        if double:
            if sched.step_index is None:
                sched._init_step_index(t)
            x = sched.dpm_solver_first_order_update(sched.convert_model_output(m, sample=x), sample=x, noise=z)
            sched._step_index += 1
        else:
            x = sched.step(m, t, x, variance_noise=z).prev_sample
        out.append(x.numpy().copy())
    return out_timesteps, sigmas, np.stack(out)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max_i |ours_i - ref_i|_inf / |ref_i|_inf over the steps of a trajectory."""
    axes = tuple(range(1, ref.ndim))
    return float(np.max(np.abs(ours - ref).max(axis=axes) / np.abs(ref).max(axis=axes)))


def assert_float32_parity(ours: np.ndarray, ref32: np.ndarray, ref64: np.ndarray, rtol: float = 1e-4) -> None:
    """Within 1e-4 of diffusers' float32 run, or, where diffusers' own float32 rounding exceeds
    that, at most twice as far from its float64 run as its float32 run is.

    Some configurations (thresholding, a sample/flow prediction on the cosine schedule) divide by
    a tiny sigma when turning x0 into eps, and there diffusers' float32 and float64 runs differ
    by more than 1e-4 themselves.
    """
    err32 = relative_error(ours, ref32)
    if err32 <= rtol:
        return
    own = relative_error(ref32, ref64)
    err64 = relative_error(ours, ref64)
    assert err64 <= 2.0 * own, f"error vs diffusers f32 {err32:.2e}, vs f64 {err64:.2e}, diffusers' own {own:.2e}"


def config_kwargs(config: dj.DEISConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


GAUSS_MEAN, GAUSS_STD = 0.5, 0.3


def gaussian_eps_model(config: dj.DEISConfig):
    """Exact noise prediction for data ~ N(0.5, 0.3^2) under the config's discrete VP schedule.

    eps(x, t) = sigma_t (x - alpha_t m) / (alpha_t^2 s^2 + sigma_t^2), alpha_t^2 = alphas_cumprod[t].
    """
    from deis_jax import schedule

    ac = jnp.asarray(schedule.alphas_cumprod(config))

    def model_fn(x, t):
        a2 = ac[jnp.clip(t, 0, ac.shape[0] - 1)]
        alpha, sigma = jnp.sqrt(a2), jnp.sqrt(1.0 - a2)
        return sigma * (x - alpha * GAUSS_MEAN) / (a2 * GAUSS_STD**2 + sigma**2)

    return model_fn


def gaussian_flow(x, alpha_from, sigma_from, alpha_to, sigma_to):
    """Exact probability-flow map for Gaussian data: (x - alpha m) / sqrt(alpha^2 s^2 + sigma^2) is invariant."""
    z = (x - alpha_from * GAUSS_MEAN) / np.sqrt(alpha_from**2 * GAUSS_STD**2 + sigma_from**2)
    return alpha_to * GAUSS_MEAN + z * np.sqrt(alpha_to**2 * GAUSS_STD**2 + sigma_to**2)


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (once; registered in sys.modules, where dataclasses look it up)."""
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
