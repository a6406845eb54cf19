"""Published step grids (`deis_jax.published_sigmas`): the numbers match their source, load and run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deis_jax
from deis_jax import DEISConfig

SD = DEISConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_names_and_numbers_match_diffusers_ays_schedules():
    """diffusers ships the same Align Your Steps tables (its last sigma is 0: its final step to zero)."""
    ays = pytest.importorskip("diffusers.schedulers.scheduling_utils").AysSchedules
    source = {"ays_sd15": "StableDiffusionSigmas", "ays_sdxl": "StableDiffusionXLSigmas",
              "ays_sd15_timesteps": "StableDiffusionTimesteps", "ays_sdxl_timesteps": "StableDiffusionXLTimesteps"}
    assert set(deis_jax.PUBLISHED_GRIDS) == set(source)
    for name, key in source.items():
        entry = deis_jax.PUBLISHED_GRIDS[name]
        if "timesteps" in entry:
            assert list(entry["timesteps"]) == ays[key]
        else:  # the project page ends at SD's sigma_min, 0.029; diffusers writes 0 there
            assert list(entry["sigmas"][:-1]) == ays[key][:-1] and entry["sigmas"][-1] == 0.029


@pytest.mark.parametrize("final", ["sigma_min", "zero"])
def test_published_grids_load_and_run(final):
    config = dataclasses.replace(SD, final_sigmas_type=final)
    rhos = deis_jax.schedule.train_rhos(config)
    for name, entry in deis_jax.PUBLISHED_GRIDS.items():
        s = deis_jax.published_sigmas(name, config)
        assert len(s) == 11 and np.all(np.diff(s) < 0)
        assert s[-1] == (0.0 if final == "zero" else rhos[0])
        if "timesteps" in entry:
            np.testing.assert_array_equal(s[:-1], rhos[np.asarray(entry["timesteps"])])
        else:  # the published values, the ends moved onto the schedule's range (14.615 -> 14.6146...)
            np.testing.assert_allclose(s[:-1], entry["sigmas"][:-1], rtol=1e-3)
            np.testing.assert_array_equal(s[1:-1], entry["sigmas"][1:-1])
        state = deis_jax.set_timesteps(config, None, (2,), sigmas=s)
        np.testing.assert_allclose(np.asarray(state.sigmas, np.float64), s, rtol=1e-6)
        out = deis_jax.sample(lambda x, t: 0.1 * x, jax.random.key(0), (2, 3), config=config, sigmas=s)
        assert np.isfinite(np.asarray(out)).all()


def test_other_step_counts_interpolate_log_sigma_linearly():
    s10 = deis_jax.published_sigmas("ays_sdxl", SD)
    s5 = deis_jax.published_sigmas("ays_sdxl", SD, 5)
    np.testing.assert_allclose(s5, s10[::2], rtol=1e-12)  # every other node of the 10-step grid
    s20 = deis_jax.published_sigmas("ays_sdxl", SD, 20)
    np.testing.assert_allclose(s20[::2], s10, rtol=1e-12)
    raw = np.asarray(deis_jax.PUBLISHED_GRIDS["ays_sdxl"]["sigmas"])  # interpolated before the ends are snapped
    np.testing.assert_allclose(s20[1::2], np.sqrt(raw[:-1] * raw[1:]), rtol=1e-12)  # geometric midpoints
    np.testing.assert_array_equal(deis_jax.published_sigmas("ays_sdxl", SD, 10), s10)


def test_published_grid_errors():
    with pytest.raises(ValueError, match="name='ays' is invalid: must be one of"):
        deis_jax.published_sigmas("ays", SD)
    with pytest.raises(ValueError, match="num_inference_steps=0 is invalid"):
        deis_jax.published_sigmas("ays_sd15", SD, 0)
    with pytest.raises(ValueError, match="is for discrete VP schedules"):
        deis_jax.published_sigmas("ays_sd15", DEISConfig(use_flow_sigmas=True))
    # SD's sigmas do not fit a schedule whose noise range ends above them.
    with pytest.raises(ValueError, match="every entry must lie in the schedule's range"):
        deis_jax.published_sigmas("ays_sd15", DEISConfig(beta_start=0.001, beta_end=0.02))


def test_timestep_grid_transfers_to_another_1000_step_schedule():
    config = DEISConfig(final_sigmas_type="zero")  # the digits model's linear betas
    s = deis_jax.published_sigmas("ays_sd15_timesteps", config, 5)
    state = deis_jax.set_timesteps(config, None, (1,), sigmas=s, dtype=jnp.float32)
    assert state.num_inference_steps == 5 and int(state.timesteps[0]) == 999
