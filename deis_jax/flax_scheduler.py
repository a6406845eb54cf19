"""`FlaxDEISMultistepScheduler`: deis_jax behind the scheduler protocol of diffusers' Flax pipelines (<= 0.39).

A thin adapter over `set_timesteps` / `step` / `add_noise` of `deis_jax.solver`: the scheduler object holds a
`DEISConfig` and a dtype, `create_state()` gives the `params["scheduler"]` pytree, `set_timesteps` returns a
`DEISState`, and `step` is `deis_jax.step`. diffusers itself is never imported.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deis_jax import solver
from deis_jax.config import DEISConfig

CONFIG_NAME = "scheduler_config.json"
# diffusers' FlaxKarrasDiffusionSchedulers (0.39): the Flax schedulers a Flax pipeline is saved with, whose
# configs `from_config` / `from_pretrained` take (any other scheduler's config works as well, see
# `DEISConfig.from_diffusers`).
COMPATIBLES = ("FlaxDDIMScheduler", "FlaxDDPMScheduler", "FlaxPNDMScheduler", "FlaxLMSDiscreteScheduler",
               "FlaxDPMSolverMultistepScheduler", "FlaxEulerDiscreteScheduler")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["init_noise_sigma"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class FlaxDEISSchedulerState:
    """What `create_state()` returns, for `params["scheduler"]`: the pipelines read `init_noise_sigma` from it
    and pass it to `set_timesteps`, which builds the schedule (a `DEISState`)."""

    init_noise_sigma: jax.Array


class FlaxDEISSchedulerOutput(NamedTuple):
    """`step`'s result: the next sample and the advanced state."""

    prev_sample: jax.Array
    state: solver.DEISState

    def to_tuple(self) -> tuple[jax.Array, solver.DEISState]:
        return self.prev_sample, self.state


def _check_state(state: Any, method: str, allowed: tuple[type, ...], hint: str) -> None:
    if not isinstance(state, allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ValueError(f"FlaxDEISMultistepScheduler.{method}: state={type(state).__name__} is invalid: must be a "
                         f"{names}; {hint}.")


class FlaxDEISMultistepScheduler:
    """DEIS with the interface of diffusers' Flax schedulers (`FlaxDPMSolverMultistepScheduler` is the model).

    The pipelines call `set_timesteps(params["scheduler"], num_inference_steps, shape)` (inside their jitted or
    pmapped `_generate`: the step count and the shape are static there), then `step` once per entry of
    `state.timesteps`, in order, inside `jax.lax.fori_loop`. The state counts the steps, so the timestep given to
    `step` is not used to find the step (diffusers' Flax pipelines cast it to int32, which is exact here).
    Samples equal `deis_jax.sample_from_noise` with the same config and model.

    Not supported: `solver_type="rhork"` and the continuous-time schedules, whose model times are floats that the
    pipelines' int32 cast would truncate (and rhork takes `solver_order` steps per inference step); loops that start
    part-way with a fresh state, as `FlaxStableDiffusionImg2ImgPipeline` does (its `add_noise` call on
    `params["scheduler"]` raises): use `deis_jax.img2img` for that.
    """

    order = 1  # model evaluations per step
    init_noise_sigma = 1.0  # x_T ~ N(0, I) for VP schedules
    compatibles = COMPATIBLES

    def __init__(self, config: DEISConfig = DEISConfig(), dtype=jnp.float32):
        if not isinstance(config, DEISConfig):
            raise ValueError(f"config={config!r} is invalid: must be a DEISConfig (use from_config for a dict or "
                             "a scheduler_config.json).")
        if config.solver_type == "rhork" or config.is_continuous:
            field = "solver_type" if config.solver_type == "rhork" else "time_schedule"
            raise ValueError(
                f"DEISConfig.{field}={getattr(config, field)!r} is invalid for FlaxDEISMultistepScheduler: its model "
                "times are floats, which diffusers' Flax pipelines truncate to int32, and the pipelines run one step "
                "per inference step (rhork takes solver_order). Use deis_jax.sample / sample_from_noise for it.")
        try:
            floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(f"dtype={dtype!r} is invalid: must be a floating dtype such as jnp.float32.")
        self.config = config
        self.dtype = jnp.dtype(dtype)

    def __repr__(self) -> str:
        return f"FlaxDEISMultistepScheduler({self.config!r}, dtype={self.dtype.name})"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike, dtype=jnp.float32,
                    **kwargs: Any) -> FlaxDEISMultistepScheduler:
        """From a diffusers scheduler config (a dict such as a pipeline's `scheduler.config`, or the path of a
        `scheduler_config.json`) of any scheduler, read by `DEISConfig.from_diffusers`; `kwargs` set `DEISConfig`
        fields over it (e.g. `solver_order=3`)."""
        base = DEISConfig.from_diffusers(config)
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(DEISConfig)})
        if unknown:
            raise ValueError(f"from_config: {unknown} are invalid keyword arguments: each must be a DEISConfig field.")
        return cls(dataclasses.replace(base, **kwargs), dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, *,
                        dtype=jnp.float32, **hub_kwargs: Any):
        """`(scheduler, state)` from `<path>/<subfolder>/scheduler_config.json`, as diffusers' Flax schedulers return.

        A path that is not a local directory is a Hub model id: the file is fetched with
        `huggingface_hub.hf_hub_download(id, "scheduler_config.json", subfolder=subfolder, **hub_kwargs)` (e.g.
        `revision=`, `cache_dir=`); huggingface_hub must be installed (diffusers depends on it).
        """
        root = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(root):
            if hub_kwargs:
                raise ValueError(f"from_pretrained: {sorted(hub_kwargs)} are invalid for the local directory "
                                 f"{root!r}: they only apply to a download from the Hub.")
            path = os.path.join(root, subfolder or "", CONFIG_NAME)
            if not os.path.isfile(path):
                raise ValueError(f"from_pretrained: {path!r} does not exist; pretrained_model_name_or_path={root!r} "
                                 f"and subfolder={subfolder!r} must name the folder holding {CONFIG_NAME}.")
        else:
            try:
                from huggingface_hub import hf_hub_download  # noqa: PLC0415 (optional)
            except ImportError:
                raise ValueError(f"pretrained_model_name_or_path={root!r} is invalid: it is not a local directory, "
                                 "and huggingface_hub, needed to fetch a Hub model's scheduler config, is not "
                                 "installed.") from None
            path = hf_hub_download(root, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        scheduler = cls.from_config(path, dtype=dtype)
        return scheduler, scheduler.create_state()

    def create_state(self) -> FlaxDEISSchedulerState:
        """The pytree to put in `params["scheduler"]` (replicate it with the other params for `jit=True`)."""
        return FlaxDEISSchedulerState(init_noise_sigma=jnp.asarray(self.init_noise_sigma, self.dtype))

    def set_timesteps(self, state: FlaxDEISSchedulerState | solver.DEISState, num_inference_steps: int,
                      shape: tuple[int, ...]) -> solver.DEISState:
        """`deis_jax.set_timesteps(self.config, num_inference_steps, shape, dtype=self.dtype)`; works while
        tracing, since the step count and the shape are static (the tables are built on the host)."""
        _check_state(state, "set_timesteps", (FlaxDEISSchedulerState, solver.DEISState),
                     "put scheduler.create_state() in params['scheduler']")
        return solver.set_timesteps(self.config, num_inference_steps, shape, dtype=self.dtype)

    def scale_model_input(self, state: solver.DEISState, sample: jax.Array, timestep: jax.Array | None = None):
        """The identity (DEIS needs no input scaling), as `deis_jax.scale_model_input`."""
        return solver.scale_model_input(state, sample, timestep)

    def step(self, state: solver.DEISState, model_output: jax.Array, timestep: jax.Array, sample: jax.Array,
             return_dict: bool = True):
        """`deis_jax.step`: a `FlaxDEISSchedulerOutput(prev_sample, state)`, or a plain tuple for return_dict=False."""
        _check_state(state, "step", (solver.DEISState,), "call set_timesteps first and pass the state it returns")
        prev_sample, state = solver.step(state, model_output, timestep, sample)
        return FlaxDEISSchedulerOutput(prev_sample, state) if return_dict else (prev_sample, state)

    def add_noise(self, state: solver.DEISState, original_samples: jax.Array, noise: jax.Array,
                  timesteps: jax.Array) -> jax.Array:
        """`deis_jax.add_noise`: alpha_t x0 + sigma_t noise, t looked up in the state's schedule."""
        _check_state(state, "add_noise", (solver.DEISState,),
                     "pass the state set_timesteps returns (the noise level of a timestep is looked up in its "
                     "schedule); for img2img use deis_jax.img2img")
        return solver.add_noise(state, original_samples, noise, timesteps)
