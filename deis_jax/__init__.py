"""deis_jax: the Diffusion Exponential Integrator Sampler (DEIS) in pure, jit-able JAX."""

from deis_jax.adaptive import (
    AdaptiveInfo as AdaptiveInfo,
    sample_adaptive as sample_adaptive,
    sample_adaptive_from_noise as sample_adaptive_from_noise,
)
from deis_jax.config import (
    ALGORITHM_TYPES as ALGORITHM_TYPES,
    BETA_SCHEDULES as BETA_SCHEDULES,
    FINAL_SIGMAS_TYPES as FINAL_SIGMAS_TYPES,
    PREDICTION_TYPES as PREDICTION_TYPES,
    SOLVER_TYPES as SOLVER_TYPES,
    TIMESTEP_SPACINGS as TIMESTEP_SPACINGS,
    DEISConfig as DEISConfig,
)
from deis_jax.flax_scheduler import (
    FlaxDEISMultistepScheduler as FlaxDEISMultistepScheduler,
    FlaxDEISSchedulerOutput as FlaxDEISSchedulerOutput,
    FlaxDEISSchedulerState as FlaxDEISSchedulerState,
)
from deis_jax.guidance import classifier_free_guidance as classifier_free_guidance
from deis_jax.learn import (
    load_grid as load_grid,
    optimize_sigmas as optimize_sigmas,
    save_grid as save_grid,
)
from deis_jax.published import PUBLISHED_GRIDS as PUBLISHED_GRIDS, published_sigmas as published_sigmas
from deis_jax.sampling import (
    NonFiniteError as NonFiniteError,
    img2img as img2img,
    run_loop as run_loop,
    sample as sample,
    sample_from_noise as sample_from_noise,
    strength_begin_index as strength_begin_index,
)
from deis_jax.solver import (
    DEISState as DEISState,
    add_noise as add_noise,
    convert_model_output as convert_model_output,
    scale_model_input as scale_model_input,
    set_begin_index as set_begin_index,
    set_timesteps as set_timesteps,
    step as step,
    with_sample_sharding as with_sample_sharding,
)

__version__ = "0.1.0"

__all__ = [
    "ALGORITHM_TYPES",
    "BETA_SCHEDULES",
    "FINAL_SIGMAS_TYPES",
    "PREDICTION_TYPES",
    "PUBLISHED_GRIDS",
    "SOLVER_TYPES",
    "TIMESTEP_SPACINGS",
    "AdaptiveInfo",
    "DEISConfig",
    "DEISState",
    "FlaxDEISMultistepScheduler",
    "FlaxDEISSchedulerOutput",
    "FlaxDEISSchedulerState",
    "NonFiniteError",
    "add_noise",
    "classifier_free_guidance",
    "convert_model_output",
    "img2img",
    "load_grid",
    "optimize_sigmas",
    "published_sigmas",
    "run_loop",
    "sample",
    "sample_adaptive",
    "sample_adaptive_from_noise",
    "sample_from_noise",
    "save_grid",
    "scale_model_input",
    "set_begin_index",
    "set_timesteps",
    "step",
    "strength_begin_index",
    "with_sample_sharding",
]
