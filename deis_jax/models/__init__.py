"""Small demo networks for deis_jax (need the optional `flax` dependency)."""

from deis_jax.models.unet import DigitsUNet, load_digits_unet, timestep_embedding
from deis_jax.models.weights import load_state, save_state

__all__ = ["DigitsUNet", "load_digits_unet", "load_state", "save_state", "timestep_embedding"]
