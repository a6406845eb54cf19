"""Parameters of a Flax NNX module as a flat .npz of "a/b/c" -> float32 array."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def save_state(model: nnx.Module, path: str) -> None:
    """Write the model's parameters to `path`."""
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)), sep="/")
    # Any: numpy's stubs would otherwise match an array against savez's `allow_pickle: bool` keyword.
    arrays: dict[str, Any] = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    np.savez(path, **arrays)


def load_state(make_model: Callable[[], M], path: str) -> M:
    """Build `make_model()` abstractly and restore the parameters saved at `path`, checking names and shapes."""
    graphdef, state = nnx.split(nnx.eval_shape(make_model))
    expected = dict(nnx.traversals.flatten_mapping(nnx.to_pure_dict(state), sep="/"))
    with np.load(path) as data:
        stored = {k: data[k] for k in data.files}
    if set(expected) != set(stored):
        raise ValueError(f"{path}: parameter names differ from the model (missing "
                         f"{sorted(set(expected) - set(stored))}, unexpected {sorted(set(stored) - set(expected))})")
    for name, ref in expected.items():
        if stored[name].shape != ref.shape:
            raise ValueError(f"{path}: {name} has shape {stored[name].shape}, expected {ref.shape}")
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(
        {k: jnp.asarray(v) for k, v in stored.items()}, sep="/"))
    return nnx.merge(graphdef, state)
