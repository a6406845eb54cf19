"""The digits UNet lives in the package (`deis_jax.models.unet`) so the demo can load it; re-exported here."""

from deis_jax.models.unet import (  # noqa: F401
    DEFAULT_WEIGHTS,
    DigitsUNet,
    ResBlock,
    load_digits_unet,
    save_state,
    timestep_embedding,
)
