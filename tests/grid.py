"""The configurations compared with diffusers, shared by the live test and `make_golden.py`."""

from __future__ import annotations

import itertools

import numpy as np

from deis_jax import DEISConfig, spacing

# A valid trained schedule different from the built-in ones (scaled-linear shape, 10% steeper).
TRAINED_BETAS = tuple(float(b) for b in np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2 * 1.1)

SIGMA_SCHEDULES = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "flow": {"use_flow_sigmas": True, "flow_shift": 3.0},
    "flow_dynamic": {"use_flow_sigmas": True, "use_dynamic_shifting": True},
}
BETAS = {
    "linear": {},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "trained": {"trained_betas": TRAINED_BETAS},
}
SPACINGS = {
    "linspace": {},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
}
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")
STEP_COUNTS = (1, 2, 3, 4, 5, 7, 10, 14, 15, 16, 20, 25, 50)
SHAPES = ((4, 8), (2, 3, 4, 4))
DYNAMIC_MU = 0.8


def diffusers_runs(kwargs: dict, n: int, shape: tuple) -> bool:
    """False where diffusers 0.42 itself crashes on a configuration it accepts.

    It crashes when the first timestep repeats (its index lookup starts at the second match and
    runs off the end) and when thresholding a 2-D sample (`np.prod([])` is a float in reshape).
    """
    timesteps, _ = spacing.timesteps_and_sigmas(DEISConfig(**kwargs), n, DYNAMIC_MU if kwargs.get(
        "use_dynamic_shifting") else None)
    return not (len(timesteps) > 1 and timesteps[0] == timesteps[1]) and not (
        kwargs.get("thresholding") and len(shape) == 2)


def _case(order, prediction, sigma, betas, spacing_name, thresholding, lower_order_final, n, shape):
    kwargs = {"solver_order": order, "prediction_type": prediction, "thresholding": thresholding,
              "lower_order_final": lower_order_final, **SIGMA_SCHEDULES[sigma], **BETAS[betas],
              **SPACINGS[spacing_name]}
    mu = DYNAMIC_MU if sigma == "flow_dynamic" else None
    name = (f"o{order}-{prediction}-{sigma}-{betas}-{spacing_name}-thr{int(thresholding)}"
            f"-lof{int(lower_order_final)}-n{n}-{len(shape)}d")
    return name, kwargs, n, shape, mu


def parity_grid() -> list[tuple[str, dict, int, tuple, float | None]]:
    """~250 configurations: every order x prediction x sigma schedule, the rest drawn with a fixed seed."""
    rng = np.random.RandomState(0)
    cases = []
    for order, prediction, sigma in itertools.product((1, 2, 3), PREDICTIONS, SIGMA_SCHEDULES):
        for _ in range(5):
            cases.append(_case(
                order, prediction, sigma,
                betas=list(BETAS)[rng.randint(len(BETAS))],
                spacing_name=list(SPACINGS)[rng.randint(len(SPACINGS))],
                thresholding=bool(rng.rand() < 0.3),
                lower_order_final=bool(rng.rand() < 0.7),
                n=int(STEP_COUNTS[rng.randint(len(STEP_COUNTS))]),
                shape=SHAPES[rng.randint(len(SHAPES))],
            ))
    return [c for c in cases if diffusers_runs(c[1], c[2], c[3])]


def golden_grid() -> list[tuple[str, dict, int, tuple, float | None]]:
    """A small subset kept as committed reference files: one case per order x sigma schedule, plus beta kinds."""
    cases = []
    for i, (order, sigma) in enumerate(itertools.product((1, 2, 3), SIGMA_SCHEDULES)):
        prediction = PREDICTIONS[i % 4] if not sigma.startswith("flow") else "flow_prediction"
        cases.append(_case(order, prediction, sigma, list(BETAS)[i % 4], list(SPACINGS)[i % 3],
                           thresholding=i % 5 == 0, lower_order_final=True, n=(5, 10, 15, 20)[i % 4],
                           shape=(2, 3, 4, 4)))
    return [c for c in cases if diffusers_runs(c[1], c[2], c[3])]
