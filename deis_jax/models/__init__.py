"""Small demo networks for deis_jax (need the optional `flax` dependency)."""

from deis_jax.models.unet import DigitsUNet, load_digits_unet, save_state, timestep_embedding

__all__ = ["DigitsUNet", "load_digits_unet", "save_state", "timestep_embedding"]
