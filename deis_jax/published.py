"""Step grids published as numbers, loadable by name: `published_sigmas(name, config)`.

Align Your Steps (Sabour, Fidler & Kreis, "Align Your Steps: Optimizing Sampling Schedules in
Diffusion Models", ICML 2024; the 10-step schedules of the project page
https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/, also in diffusers' `AysSchedules`):

    ays_sd15             sigmas (rho) for Stable Diffusion 1.x/2.x (scaled_linear 0.00085..0.012)
    ays_sdxl             sigmas (rho) for SDXL (same betas)
    ays_sd15_timesteps   training timesteps for Stable Diffusion 1.x/2.x (1000 training steps)
    ays_sdxl_timesteps   training timesteps for SDXL

Each schedule is optimised for its model; the timestep forms transfer to any 1000-step discrete
VP schedule, the sigma forms only to models with the same noise range. Other step counts are
interpolated linearly in log sigma over the step index, the authors' recipe for N != 10.
"""

from __future__ import annotations

import numpy as np

from deis_jax import schedule, spacing
from deis_jax.config import DEISConfig

PUBLISHED_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "ays_sd15": {"sigmas": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)},
    "ays_sdxl": {"sigmas": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)},
    "ays_sd15_timesteps": {"timesteps": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24)},
    "ays_sdxl_timesteps": {"timesteps": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13)},
}


def _log_linear(levels: np.ndarray, num_inference_steps: int) -> np.ndarray:
    """N + 1 levels from the published ones: log sigma interpolated linearly over the step index in [0, 1]."""
    src = np.linspace(0.0, 1.0, len(levels))
    return np.exp(np.interp(np.linspace(0.0, 1.0, num_inference_steps + 1), src, np.log(levels)))


def published_sigmas(name: str, config: DEISConfig, num_inference_steps: int | None = None) -> np.ndarray:
    """The published grid `name` (see `PUBLISHED_GRIDS`) as N + 1 sigmas for `set_timesteps(..., sigmas=)`,
    `sample(..., sigmas=)`: in the config's convention (rho), ending at the schedule's smallest noise level, or
    at 0 with final_sigmas_type="zero". A timestep grid takes the config's training rho at its timesteps.
    `num_inference_steps` (default: the published count) interpolates in log sigma."""
    if name not in PUBLISHED_GRIDS:
        raise ValueError(f"name={name!r} is invalid: must be one of {tuple(PUBLISHED_GRIDS)}.")
    if config.is_continuous or config.use_flow_sigmas:
        raise ValueError(f"published grid {name!r} is for discrete VP schedules (betas); config has "
                         f"time_schedule={config.time_schedule!r}, use_flow_sigmas={config.use_flow_sigmas}.")
    entry = PUBLISHED_GRIDS[name]
    if "timesteps" in entry:
        rhos = schedule.train_rhos(config)
        levels = np.append(rhos[np.asarray(entry["timesteps"])], rhos[0])
    else:
        levels = np.asarray(entry["sigmas"], np.float64)
    if num_inference_steps is not None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} is invalid: must be an int >= 1.")
        if num_inference_steps != len(levels) - 1:
            levels = _log_linear(levels, int(num_inference_steps))
    if config.final_sigmas_type == "zero":
        levels = np.append(levels[:-1], 0.0)
    return np.asarray(spacing.check_sigmas(config, levels, None))
