"""A small CNN classifier (Flax NNX) for 8x8x1 digits in [-1, 1], used as the feature net of the digits FID.

Layout: conv3x3(16) -> conv3x3(32, stride 2) -> flatten(4*4*32) -> dense(64) = `features` -> dense(10) = `logits`,
ReLU after every hidden layer (about 39k parameters). Weights are an .npz of "path/to/param" -> float32 array,
written by `deis_jax.models.unet.save_state` and read by `load_digits_classifier`.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from deis_jax.models.weights import load_state

DEFAULT_CLASSIFIER_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets",
                                          "digits_classifier.npz")
FEATURE_DIM = 64


class DigitsClassifier(nnx.Module):
    """`features(x)`: [B, 8, 8, 1] -> [B, 64] penultimate ReLU activations; `logits(x)`: -> [B, 10]."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 32, FEATURE_DIM, rngs=rngs)
        self.out = nnx.Linear(FEATURE_DIM, 10, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.conv1(x))
        h = nnx.relu(self.conv2(h))
        return nnx.relu(self.fc(h.reshape(h.shape[0], -1)))

    def logits(self, x: jax.Array) -> jax.Array:
        return self.out(self.features(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.logits(x)


def load_digits_classifier(path: str | None = None) -> DigitsClassifier:
    """Rebuild a `DigitsClassifier` from an .npz written by `save_state` (default: the packaged weights)."""
    return load_state(lambda: DigitsClassifier(rngs=nnx.Rngs(0)), DEFAULT_CLASSIFIER_WEIGHTS if path is None else path)
