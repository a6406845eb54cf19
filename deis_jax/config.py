"""`DEISConfig`: the frozen, validated, hashable scheduler configuration.

Its fields and defaults are those of diffusers' `DEISMultistepScheduler`
(0.42), so a `scheduler_config.json` from the Hub round-trips through
`DEISConfig.from_diffusers` / `DEISConfig.to_diffusers`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
# "deis": the polynomial is fitted to the noise estimates eps (the paper's form); "data_prediction": to the
# denoised estimates x0 (DPM-Solver++'s form; the name is that of diffusers' SA-Solver).
ALGORITHM_TYPES = ("deis", "data_prediction")
# Where the last step ends: the schedule's smallest noise level (diffusers' DEIS), or 0, i.e. on the
# model's denoised estimate (diffusers' DPM-Solver option of this name).
FINAL_SIGMAS_TYPES = ("sigma_min", "zero")
SOLVER_TYPES = ("logrho", "tab", "rhoab", "ipndm", "rhork")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing", "quadratic")
TIME_SHIFT_TYPES = ("exponential",)
TIME_SCHEDULES = ("discrete", "vp_linear", "vp_cosine", "ve")
# What a variance-exploding model is given as its time: sigma itself (k-diffusion's convention) or EDM's
# c_noise = ln(sigma) / 4.
VE_TIME_INPUTS = ("sigma", "c_noise")
MAX_SOLVER_ORDER = {"logrho": 3, "tab": 4, "rhoab": 4, "ipndm": 4, "rhork": 4}
# Explicit Runge-Kutta tableaus (c, A, b): Euler, Heun, Kutta's third order, classic RK4.
RUNGE_KUTTA = {
    1: ((0.0,), ((0.0,),), (1.0,)),
    2: ((0.0, 1.0), ((0.0, 0.0), (1.0, 0.0)), (0.5, 0.5)),
    3: ((0.0, 0.5, 1.0), ((0, 0, 0), (0.5, 0, 0), (-1.0, 2.0, 0)), (1 / 6, 4 / 6, 1 / 6)),
    4: ((0.0, 0.5, 0.5, 1.0), ((0, 0, 0, 0), (0.5, 0, 0, 0), (0, 0.5, 0, 0), (0, 0, 1.0, 0)),
        (1 / 6, 2 / 6, 2 / 6, 1 / 6)),
}

# End of the continuous-time interval [t_min, t_max]: the default and the largest allowed t_max. The cosine
# schedule's alpha vanishes at t = 1 (rho = sigma/alpha = 1.6e16 there, and accuracy collapses), so it stops
# at 0.9946, as DPM-Solver's NoiseScheduleVP does.
DEFAULT_T_MAX = {"vp_linear": 1.0, "vp_cosine": 0.9946}

# Values diffusers accepts and silently rewrites (its `register_to_config` fallbacks).
_ALGORITHM_ALIASES = {"dpmsolver": "deis", "dpmsolver++": "deis"}
_SOLVER_ALIASES = {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"}
# Settings of the other schedulers diffusers lists as compatible with DEIS (0.42): options of their own
# sampling algorithms. `DEISMultistepScheduler.from_config` drops them quietly, and so does `from_diffusers`.
_OTHER_SAMPLER_KEYS = frozenset((
    "clip_sample", "clip_sample_range", "disable_corrector", "euler_at_final", "final_sigmas_type",
    "interpolation_type", "lambda_min_clipped", "predict_x0", "rho", "set_alpha_to_one", "shift_terminal",
    "sigma_data", "sigma_max", "sigma_min", "sigma_schedule", "skip_prk_steps", "solver_p", "use_lu_lambdas",
    "variance_type"))
# Settings of those schedulers that describe the model (its betas, its timestep input), with the value under
# which DEIS computes the same thing without them. diffusers' DEIS drops them quietly whatever their value;
# `from_diffusers` drops them too, but warns when the value differs.
_MODEL_KEYS = {"rescale_betas_zero_snr": False, "timestep_type": "discrete"}


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"DEISConfig.{field}={value!r} is invalid: {allowed}.")


def _check_choice(field: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        _fail(field, value, f"must be one of {choices}")


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        _fail(field, value, "must be a bool")
    return bool(value)


def _check_int(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        _fail(field, value, f"must be an int >= {minimum}")
    return int(value)


def _check_float(field: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool, why: str = "") -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok:
        value = float(value)
        above = value > lo if lo_open else value >= lo
        below = value < hi if hi_open else value <= hi
        ok = math.isfinite(value) and above and below
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        _fail(field, value, f"must be a finite number in {interval}{why}")
    return value


def _check_trained_betas(value: Any, num_train_timesteps: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        betas = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        _fail("trained_betas", value, "must be a 1-D sequence of numbers")
    if betas.ndim != 1 or betas.size != num_train_timesteps:
        _fail(
            "trained_betas",
            f"<array of shape {betas.shape}>",
            f"must be 1-D with num_train_timesteps={num_train_timesteps} entries",
        )
    bad = ~np.isfinite(betas) | (betas < 0) | (betas > 1)
    bad[:-1] |= betas[:-1] == 1
    if bad.any():
        i = int(np.argmax(bad))
        _fail(
            "trained_betas",
            f"<entry {i} = {betas[i]}>",
            "every beta must be finite and in [0, 1); only the last may equal 1 (zero terminal SNR)",
        )
    return tuple(float(b) for b in betas)


@dataclasses.dataclass(frozen=True)
class DEISConfig:
    """Configuration of the DEIS multistep scheduler (diffusers' field names and defaults).

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    `trained_betas` is stored as a tuple of floats.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "deis"
    solver_type: str = "logrho"
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    # deis_jax extensions (not in diffusers): continuous-time VP models (score-SDE style).
    time_schedule: str = "discrete"
    continuous_beta_min: float = 0.1
    continuous_beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float | None = None
    # deis_jax extension: variance-exploding (EDM) models, time_schedule="ve": x = x0 + sigma eps on
    # [sigma_min, sigma_max] (EDM's defaults), the model given sigma or c_noise (VE_TIME_INPUTS).
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    ve_time_input: str = "sigma"
    # deis_jax extension: how many leading axes of a sample index examples. Dynamic thresholding takes one
    # quantile per example, over all remaining axes. 1: samples are (batch, ...), diffusers' convention.
    # 0: each sample is one example, e.g. when `jax.vmap` maps the sampler over examples of shape (C, H, W).
    thresholding_batch_axes: int = 1
    # deis_jax extension (a diffusers DPM-Solver option that diffusers' DEIS lacks): see FINAL_SIGMAS_TYPES.
    final_sigmas_type: str = "sigma_min"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("num_train_timesteps", _check_int("num_train_timesteps", self.num_train_timesteps, 2))
        set_("beta_start", _check_float("beta_start", self.beta_start, 0.0, 1.0, False, True))
        set_("beta_end", _check_float("beta_end", self.beta_end, 0.0, 1.0, False, True))
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        set_("trained_betas", _check_trained_betas(self.trained_betas, self.num_train_timesteps))
        no_noise = (self.trained_betas is not None and max(self.trained_betas) == 0) or (
            self.trained_betas is None and self.beta_schedule != "squaredcos_cap_v2"
            and self.beta_start == 0 and self.beta_end == 0)
        if no_noise:
            _fail("beta_end" if self.trained_betas is None else "trained_betas", 0.0,
                  "the betas are all zero, so the schedule adds no noise; some beta must be positive")

        _check_choice("algorithm_type", self.algorithm_type, ALGORITHM_TYPES + tuple(_ALGORITHM_ALIASES))
        set_("algorithm_type", _ALGORITHM_ALIASES.get(self.algorithm_type, self.algorithm_type))
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        _check_choice("solver_type", self.solver_type, SOLVER_TYPES + tuple(_SOLVER_ALIASES))
        set_("solver_type", _SOLVER_ALIASES.get(self.solver_type, self.solver_type))
        max_order = MAX_SOLVER_ORDER[self.solver_type]
        set_("solver_order", _check_int("solver_order", self.solver_order, 1))
        if self.solver_order > max_order:
            _fail("solver_order", self.solver_order, f"must be in 1..{max_order} for solver_type={self.solver_type!r}")

        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        for name in ("thresholding", "lower_order_final", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"):
            set_(name, _check_bool(name, getattr(self, name)))
        set_("dynamic_thresholding_ratio", _check_float(
            "dynamic_thresholding_ratio", self.dynamic_thresholding_ratio, 0.0, 1.0, False, False))
        set_("thresholding_batch_axes", _check_int("thresholding_batch_axes", self.thresholding_batch_axes, 0))
        set_("sample_max_value", _check_float("sample_max_value", self.sample_max_value, 0.0, math.inf, True, True))
        set_("flow_shift", _check_float("flow_shift", self.flow_shift, 0.0, math.inf, True, True))
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        set_("steps_offset", _check_int("steps_offset", self.steps_offset, 0))
        _check_choice("time_shift_type", self.time_shift_type, TIME_SHIFT_TYPES)

        _check_choice("time_schedule", self.time_schedule, TIME_SCHEDULES)
        set_("continuous_beta_min", _check_float(
            "continuous_beta_min", self.continuous_beta_min, 0.0, math.inf, False, True))
        set_("continuous_beta_max", _check_float(
            "continuous_beta_max", self.continuous_beta_max, self.continuous_beta_min, math.inf, True, True))
        set_("t_min", _check_float("t_min", self.t_min, 0.0, 1.0, True, True))
        set_("sigma_min", _check_float("sigma_min", self.sigma_min, 0.0, math.inf, True, True))
        set_("sigma_max", _check_float("sigma_max", self.sigma_max, self.sigma_min, math.inf, True, True))
        _check_choice("ve_time_input", self.ve_time_input, VE_TIME_INPUTS)
        if self.time_schedule == "ve":
            self._check_ve()
        else:
            self._check_defaults(("sigma_min", "sigma_max", "ve_time_input"), "is only used with time_schedule='ve'")
        if self.time_schedule in DEFAULT_T_MAX:  # VP
            t_max_limit = DEFAULT_T_MAX[self.time_schedule]
            if self.t_max is None:
                set_("t_max", t_max_limit)
            set_("t_max", _check_float("t_max", self.t_max, self.t_min, t_max_limit, True, False,
                                       f" for time_schedule={self.time_schedule!r}"))
            if self.use_flow_sigmas or self.trained_betas is not None:
                _fail("time_schedule", self.time_schedule,
                      "continuous-time schedules cannot be combined with use_flow_sigmas or trained_betas")
        elif self.t_max is not None:
            _fail("t_max", self.t_max, "is only used with a continuous time_schedule; leave it None")

        if (self.trained_betas is not None and self.trained_betas[-1] == 1.0
                and self.prediction_type in ("sample", "v_prediction") and self.solver_type in ("tab", "rhork")):
            _fail("solver_type", self.solver_type, "a zero-terminal-SNR schedule (last trained beta = 1) with "
                  "sample/v prediction needs 'logrho', 'rhoab' or 'ipndm' (their first step is the exact limit)")

        chosen = [n for n in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")
                  if getattr(self, n)]
        if len(chosen) > 1:
            _fail(", ".join(chosen), True, "at most one sigma schedule may be enabled at once")
        if (self.trained_betas is not None and self.trained_betas[-1] == 1.0
                and self.prediction_type in ("sample", "v_prediction") and self.uses_sigma_grid):
            _fail(chosen[0], True, "a zero-terminal-SNR schedule (last trained beta = 1) with sample/v prediction "
                  "starts at sigma = inf, where a Karras/exponential/beta grid is undefined; use a "
                  "timestep_spacing (Lin et al. recommend 'trailing')")

        from deis_jax import spacing  # noqa: PLC0415 (spacing imports this module)

        spacing.check_config(self)  # a usable step grid: finite noise levels, timesteps in range

    def _check_ve(self) -> None:
        """time_schedule="ve": sigma grids only (Karras unless exponential/beta is chosen), a denoiser
        (sample) or eps model, no VP-only fields."""
        if self.t_max is not None:
            _fail("t_max", self.t_max, "is only used with a VP time_schedule; a 've' schedule runs on "
                  "[sigma_min, sigma_max]; leave it None")
        self._check_defaults(("t_min", "continuous_beta_min", "continuous_beta_max"),
                             "is only used with a VP time_schedule; a 've' schedule runs on [sigma_min, sigma_max]")
        if self.use_flow_sigmas or self.trained_betas is not None:
            _fail("time_schedule", "ve", "cannot be combined with use_flow_sigmas or trained_betas")
        if self.prediction_type not in ("epsilon", "sample"):
            _fail("prediction_type", self.prediction_type, "must be 'sample' (a denoiser D(x, sigma)) or 'epsilon' "
                  "for time_schedule='ve'")
        if self.timestep_spacing != "linspace":
            _fail("timestep_spacing", self.timestep_spacing, "is not used by time_schedule='ve', whose grids are "
                  "sigma grids (use_karras_sigmas, the default there, use_exponential_sigmas, use_beta_sigmas, "
                  "or sigmas=); leave it 'linspace'")

    def _check_defaults(self, names: tuple[str, ...], why: str) -> None:
        """ValueError for a field of another schedule set away from its default (it would be ignored)."""
        for name in names:
            default = type(self).__dataclass_fields__[name].default
            if getattr(self, name) != default:
                _fail(name, getattr(self, name), f"{why}; leave it at its default {default!r}")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any] | str | os.PathLike) -> DEISConfig:
        """Build from a diffusers scheduler config: a dict or a path to `scheduler_config.json`.

        Its diffusers fields are those `DEISMultistepScheduler.from_config(config)` gets, for any
        `_class_name`: keys listed in `_use_default_values` (defaults of the class the config came
        from, never chosen) are dropped, so DEIS's own defaults apply; keys DEIS lacks are ignored.
        A warning lists the ignored keys that may matter: unknown keys (not a setting of a diffusers
        scheduler compatible with DEIS), and `rescale_betas_zero_snr` / `timestep_type` away from
        their neutral values (they change the model's betas or timestep input).
        """
        if isinstance(config, (str, os.PathLike)):
            with open(config) as f:
                config = json.load(f)
        if not isinstance(config, Mapping):
            raise ValueError(f"config={config!r} is invalid: must be a dict or a path to a JSON file.")
        defaults = config.get("_use_default_values", [])
        if not isinstance(defaults, (list, tuple)) or not all(isinstance(k, str) for k in defaults):
            raise ValueError(f"config['_use_default_values']={defaults!r} is invalid: must be a list of key names.")
        config = {k: v for k, v in config.items() if k not in defaults and not k.startswith("_")}
        # Other samplers' options that are also deis_jax extensions (final_sigmas_type) are dropped like the rest.
        names = {f.name for f in dataclasses.fields(cls)} - _OTHER_SAMPLER_KEYS
        noted = {k: v for k, v in sorted(config.items()) if k not in names and k not in _OTHER_SAMPLER_KEYS
                 and (k not in _MODEL_KEYS or v != _MODEL_KEYS[k])}
        if noted:
            warnings.warn(f"DEISConfig.from_diffusers ignores {noted}: DEIS has no such settings (nor has "
                          "diffusers' DEISMultistepScheduler), so samples may differ from those of the "
                          "scheduler this config was written for.", stacklevel=2)
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def is_continuous(self) -> bool:
        """Continuous time: the model gets float times (VP t in [t_min, t_max], or VE sigma)."""
        return self.time_schedule != "discrete"

    @property
    def is_ve(self) -> bool:
        """Variance exploding: alpha = 1, sigma = rho (time_schedule="ve")."""
        return self.time_schedule == "ve"

    @property
    def uses_sigma_grid(self) -> bool:
        """Steps placed by a sigma schedule (Karras, exponential or beta) rather than a spacing (always for VE)."""
        return self.use_karras_sigmas or self.use_exponential_sigmas or self.use_beta_sigmas or self.is_ve

    @property
    def uses_karras_sigmas(self) -> bool:
        """The Karras grid: `use_karras_sigmas`, or a VE schedule without another sigma schedule (EDM's default)."""
        return self.use_karras_sigmas or (self.is_ve and not (self.use_exponential_sigmas or self.use_beta_sigmas))

    @property
    def predicts_data(self) -> bool:
        """The data-prediction form: the solver extrapolates x0 (algorithm_type="data_prediction")."""
        return self.algorithm_type == "data_prediction"

    @property
    def evaluations_per_step(self) -> int:
        """Model evaluations (`step` calls) per solver step: solver_order for rhork, else 1."""
        return self.solver_order if self.solver_type == "rhork" else 1

    def to_diffusers(self) -> dict[str, Any]:
        """The fields as a dict that `DEISMultistepScheduler.from_config` accepts.

        Raises ValueError for the deis_jax extensions diffusers does not have; leaves out
        `thresholding_batch_axes` (how samples are laid out, not what is computed).
        """
        for field, plain in (("solver_type", "logrho"), ("time_schedule", "discrete"), ("algorithm_type", "deis"),
                             ("final_sigmas_type", "sigma_min")):
            if getattr(self, field) != plain:
                _fail(field, getattr(self, field), f"diffusers only supports {plain!r}")
        if self.timestep_spacing == "quadratic":
            _fail("timestep_spacing", "quadratic", "diffusers only supports linspace, leading and trailing")
        out = {k: v for k, v in dataclasses.asdict(self).items() if k in DIFFUSERS_FIELDS}
        if self.trained_betas is not None:
            out["trained_betas"] = list(self.trained_betas)
        return out


_NAMES = [f.name for f in dataclasses.fields(DEISConfig)]
DIFFUSERS_FIELDS = tuple(_NAMES[: _NAMES.index("time_shift_type") + 1])
