"""The digits UNet lives in the package (`deis_jax.models.unet`) so the demo can load it; re-exported here."""

from deis_jax.models.unet import DEFAULT_WEIGHTS, DigitsUNet, ResBlock, load_digits_unet, timestep_embedding  # noqa: F401
from deis_jax.models.weights import save_state  # noqa: F401
